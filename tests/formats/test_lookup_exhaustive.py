"""The CPU's table-lookup dequantization (pipeline/formats/lookup.py) against the arithmetic it replaces,
bit for bit: every (UE8M0 scale byte, code byte) pair of MXFP4 and of FP8 block, NaN scales and codes
included, then random tensors of the release's shapes, odd shapes with partial tiles, and batched
experts. The arithmetic (``_dequantize_arith``) is the implementation every earlier byte-equality test
and the ModelOpt/transformers cross-checks were written against; it still runs on CUDA and for other
output dtypes."""

import pytest
import torch

from pipeline.formats import fp8_block as F
from pipeline.formats import fp8_block_dequantize, mxfp4_dequantize
from pipeline.formats import mxfp4 as M

pytestmark = pytest.mark.unit


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16)


def _every_byte() -> torch.Tensor:
    return torch.arange(256, dtype=torch.int32).to(torch.uint8)


def test_mxfp4_every_scale_byte_with_every_packed_byte():
    # rows of one block: 16 rows cover the 256 packed bytes, repeated under each of the 256 scale bytes
    packed = _every_byte().view(torch.int8).reshape(16, 16).repeat(256, 1)
    scale = _every_byte().repeat_interleave(16).reshape(-1, 1)
    for s in (scale, scale.view(torch.float8_e8m0fnu)):
        got = mxfp4_dequantize(packed, s, torch.bfloat16)
        want = M._dequantize_arith(packed, s, torch.bfloat16)
        assert torch.equal(_bits(got), _bits(want))  # NaN scale 0xFF included: the same NaN bits


def test_fp8_every_scale_byte_with_every_e4m3_byte():
    # one 128x128 tile per scale byte, each holding all 256 e4m3 bytes (NaN 0x7F and 0xFF included)
    tile = _every_byte().repeat(64).reshape(128, 128)
    q = tile.repeat(1, 256).view(torch.float8_e4m3fn)
    scale = _every_byte().reshape(1, 256)
    for s in (scale, scale.view(torch.float8_e8m0fnu)):
        got = fp8_block_dequantize(q, s, dtype=torch.bfloat16)
        want = F._dequantize_arith(q, s, (128, 128), torch.bfloat16)
        assert torch.equal(_bits(got), _bits(want))


@pytest.mark.parametrize("shape", [(3072, 7168), (7168, 3072), (2, 4, 64), (1, 32), (0, 64), (5, 0)], ids=str)
def test_mxfp4_random_tensors(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    packed = torch.randint(-128, 128, (*shape[:-1], shape[-1] // 2), generator=gen, dtype=torch.int8)
    scale = torch.randint(0, 255, (*shape[:-1], shape[-1] // 32), generator=gen, dtype=torch.uint8)
    got = mxfp4_dequantize(packed, scale.view(torch.float8_e8m0fnu), torch.bfloat16)
    assert got.shape == shape and got.dtype == torch.bfloat16
    assert torch.equal(_bits(got), _bits(M._dequantize_arith(packed, scale, torch.bfloat16)))


def test_mxfp4_non_contiguous_input():
    packed = torch.randint(-128, 128, (64, 32), dtype=torch.int8)
    scale = torch.randint(100, 140, (64, 4), dtype=torch.uint8)
    cols = packed[:, :16]  # a strided view: every row's first 32 inputs
    got = mxfp4_dequantize(cols, scale[:, :1], torch.bfloat16)
    assert torch.equal(
        _bits(got), _bits(M._dequantize_arith(cols.contiguous(), scale[:, :1], torch.bfloat16))
    )


@pytest.mark.parametrize(
    "shape, block",
    [
        ((1536, 7168), (128, 128)),
        ((300, 200), (128, 128)),
        ((1, 1), (128, 128)),
        ((64, 96), (16, 32)),
        ((0, 128), (128, 128)),
        ((257, 129), (128, 128)),
    ],
    ids=str,
)
def test_fp8_random_tensors_with_partial_tiles(shape, block):
    gen = torch.Generator().manual_seed(shape[0] * 7 + shape[1])
    q = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8).view(torch.float8_e4m3fn)
    grid = (-(-shape[0] // block[0]), -(-shape[1] // block[1]))
    scale = torch.randint(0, 256, grid, generator=gen, dtype=torch.uint8)
    got = fp8_block_dequantize(q, scale.view(torch.float8_e8m0fnu), block, torch.bfloat16)
    assert got.shape == shape
    assert torch.equal(_bits(got), _bits(F._dequantize_arith(q, scale, block, torch.bfloat16)))


def test_other_dtypes_and_float_scales_take_the_arithmetic():
    q = torch.randint(0, 126, (128, 128), dtype=torch.uint8).view(torch.float8_e4m3fn)
    scale = torch.tensor([[0.5]])
    assert torch.equal(
        fp8_block_dequantize(q, scale), F._dequantize_arith(q, scale, (128, 128), torch.bfloat16)
    )
    packed = torch.randint(-128, 128, (4, 16), dtype=torch.int8)
    s8 = torch.full((4, 1), 127, dtype=torch.uint8)
    assert torch.equal(
        mxfp4_dequantize(packed, s8, torch.float32), M._dequantize_arith(packed, s8, torch.float32)
    )
