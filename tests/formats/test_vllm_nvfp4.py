"""NVFP4 dequantization against vLLM's own emulation utils (the path vLLM uses without FP4 kernels)."""

import pytest
import torch

from pipeline.formats import e2m1_decode, nvfp4_dequantize, nvfp4_quantize, unpack_nibbles

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def emulation():
    from vllm.model_executor.layers.quantization.utils import nvfp4_emulation_utils

    return nvfp4_emulation_utils


def test_break_fp4_bytes_matches_our_unpack_and_decode_for_every_byte(emulation):
    every = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(16, 16)
    ref = emulation.break_fp4_bytes(every, torch.float32)
    ours = e2m1_decode(unpack_nibbles(every))
    # vLLM builds -0 as 0 * -1.0 = -0.0 as well; compare values and signs
    assert torch.equal(ref, ours)
    assert torch.equal(torch.signbit(ref), torch.signbit(ours))


@pytest.mark.parametrize("shape", [(3072, 7168), (7168, 3072)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_dequantize_matches_vllm(emulation, shape, dtype):
    gen = torch.Generator().manual_seed(shape[0])
    w = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
    packed, ws, ws2 = nvfp4_quantize(w)
    # vLLM multiplies the e4m3 block scale by the tensor's global factor, in that order (swizzle=False
    # is the unswizzled [out, in/16] layout the checkpoint stores)
    ref = emulation.dequantize_to_dtype(packed, ws, ws2, dtype, block_size=16, swizzle=False)
    assert torch.equal(nvfp4_dequantize(packed, ws, ws2, dtype), ref)
