"""ue8m0_products_finite, exhaustively: for every UE8M0 scale byte and every element code of both
formats dequantization multiplies (E2M1, e4m3), its answer equals whether the real dequantized values
are all finite, in each output dtype. `dsv4 dequant` skips its pass over the output on True, so a True
where a product overflows would let an infinite value into a checkpoint."""

import pytest
import torch

from pipeline.formats import (
    E2M1_MAX,
    FP8_E4M3_MAX,
    fp8_block_dequantize,
    mxfp4_dequantize,
    ue8m0_products_finite,
)

pytestmark = pytest.mark.unit

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SCALE_BYTES = range(255)  # 0xFF is NaN: its own test


def _every_e4m3() -> torch.Tensor:
    b = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    return b[(b & 0x7F) != 0x7F].view(torch.float8_e4m3fn)  # the 254 non-NaN codes


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mxfp4_every_scale_byte_every_byte_of_codes(dtype):
    # one MXFP4 block (16 bytes) per row: 16 rows hold all 256 packed bytes, once per scale byte
    every = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.int8).reshape(16, 16)
    packed = every.repeat(len(SCALE_BYTES), 1)
    scale_bytes = torch.tensor(SCALE_BYTES, dtype=torch.int32).to(torch.uint8).repeat_interleave(16)
    values = mxfp4_dequantize(packed, scale_bytes.view(torch.float8_e8m0fnu).reshape(-1, 1), dtype)
    finite = torch.isfinite(values).reshape(len(SCALE_BYTES), -1).all(dim=1)
    overflows = 0
    for i, byte in enumerate(SCALE_BYTES):
        scale = torch.tensor([[byte]], dtype=torch.uint8).view(torch.float8_e8m0fnu)
        claim = ue8m0_products_finite(scale, E2M1_MAX, dtype)
        assert claim == bool(finite[i]), (byte, claim)
        overflows += not claim
    assert overflows > 0  # the top bytes do overflow: the check is not vacuous


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fp8_every_scale_byte_every_e4m3_value(dtype):
    # one 128x128 tile per scale byte, each holding every non-NaN e4m3 value
    codes = _every_e4m3()
    tile = codes.view(torch.uint8).repeat(-(-128 * 128 // codes.numel()))[: 128 * 128].reshape(128, 128)
    q = tile.repeat(1, len(SCALE_BYTES)).view(torch.float8_e4m3fn)
    scale = torch.tensor([list(SCALE_BYTES)], dtype=torch.int32).to(torch.uint8)
    values = fp8_block_dequantize(q, scale.view(torch.float8_e8m0fnu), dtype=dtype)
    finite = torch.isfinite(values).reshape(128, len(SCALE_BYTES), 128).all(dim=2).all(dim=0)
    overflows = 0
    for i, byte in enumerate(SCALE_BYTES):
        one = torch.tensor([[byte]], dtype=torch.uint8)
        claim = ue8m0_products_finite(one, FP8_E4M3_MAX, dtype)
        assert claim == bool(finite[i]), (byte, claim)
        overflows += not claim
    assert overflows > 0


def test_the_largest_byte_decides_for_a_whole_tensor():
    low = torch.full((4, 8), 120, dtype=torch.uint8)
    assert ue8m0_products_finite(low, FP8_E4M3_MAX, torch.bfloat16)
    low[2, 5] = 0xFE  # 448 * 2^127 overflows
    assert not ue8m0_products_finite(low.view(torch.float8_e8m0fnu), FP8_E4M3_MAX, torch.bfloat16)


def test_nan_byte_and_empty():
    assert not ue8m0_products_finite(torch.tensor([0, 0xFF], dtype=torch.uint8), 1.0, torch.float32)
    assert ue8m0_products_finite(torch.empty(0, dtype=torch.uint8), E2M1_MAX, torch.bfloat16)


def test_rejects_float_scales():
    with pytest.raises(TypeError, match="uint8"):
        ue8m0_products_finite(torch.ones(2), E2M1_MAX, torch.bfloat16)
