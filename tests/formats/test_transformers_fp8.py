"""FP8 block quantize/dequantize against transformers 5.23's finegrained_fp8 integration, byte for byte.

transformers only tiles shapes that divide by the block (it leaves others unquantized), so the shapes
here divide by 128; partial edge tiles are covered in tests/formats/test_fp8_block.py.
"""

import types

import pytest
import torch

from pipeline.formats import fp8_block_dequantize, fp8_block_quantize, mxfp4_dequantize, pack_nibbles

pytestmark = pytest.mark.quant

# V4 Pro attention wq_a [1536, 7168], wkv [512, 7168], wo_b slice [7168, 2048]
SHAPES = [(1536, 7168), (512, 7168), (7168, 2048)]


def _hf_quantizer(scale_fmt):
    from transformers import FineGrainedFP8Config

    cfg = FineGrainedFP8Config(weight_block_size=[128, 128], scale_fmt=scale_fmt)
    return types.SimpleNamespace(quantization_config=cfg)


def _weight(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * 0.02
    w[:128, :128] = 0  # an all-zero tile
    return w.to(torch.bfloat16)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("ours,theirs", [("ue8m0", "ue8m0"), ("float32", "float")])
def test_quantize_matches_transformers(shape, ours, theirs):
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    w = _weight(shape, seed=shape[0])
    ref = Fp8Quantize(_hf_quantizer(theirs))._quantize_one("x.weight", w)
    q, scale = fp8_block_quantize(w, scale_fmt=ours)
    assert ref["x.weight_scale_inv"].dtype == scale.dtype
    assert torch.equal(q.view(torch.uint8), ref["x.weight"].view(torch.uint8))
    if ours == "ue8m0":
        assert torch.equal(scale.view(torch.uint8), ref["x.weight_scale_inv"].view(torch.uint8))
    else:
        assert torch.equal(scale, ref["x.weight_scale_inv"])


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("scale_fmt", ["ue8m0", "float32"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_dequantize_matches_transformers(shape, scale_fmt, dtype):
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    q, scale = fp8_block_quantize(_weight(shape, seed=1), scale_fmt=scale_fmt)
    ref = Fp8Dequantize(_hf_quantizer("ue8m0"))._dequantize_one(q, scale, output_dtype=dtype)
    assert torch.equal(fp8_block_dequantize(q, scale, dtype=dtype), ref)


def test_mxfp4_dequantize_matches_transformers_fp4_path():
    """transformers dequantizes the release's int8 MXFP4 experts with the same op (block from the
    scale grid): a second independent reference next to ModelOpt's."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    gen = torch.Generator().manual_seed(2)
    codes = torch.randint(16, (3072, 7168), generator=gen, dtype=torch.int64).to(torch.uint8)
    packed = pack_nibbles(codes).view(torch.int8)
    scale = torch.randint(100, 140, (3072, 224), generator=gen, dtype=torch.int64).to(torch.uint8)
    scale = scale.view(torch.float8_e8m0fnu)
    ref = Fp8Dequantize(_hf_quantizer("ue8m0"))._dequantize_one(packed, scale, output_dtype=torch.bfloat16)
    assert torch.equal(mxfp4_dequantize(packed, scale, torch.bfloat16), ref)
