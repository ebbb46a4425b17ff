"""MXFP4 as DeepSeek V4 ships its routed experts: E2M1 codes packed two per int8 byte ([out, in/2])
and one UE8M0 scale per 32 inputs ([out, in/32]).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from ._checks import (
    FLOAT_DTYPES,
    require_dtype,
    require_finite,
    require_last_dim_multiple,
    require_min_ndim,
    require_shape,
)
from .e2m1 import E2M1_MAX, decode_packed, e2m1_encode, pack_nibbles
from .fp8_block import fp8_block_quantize
from .lookup import lookup_groups, pair_codes
from .ue8m0 import ue8m0_decode, ue8m0_encode

MXFP4_BLOCK = 32
_PACKED_DTYPES = (torch.int8, torch.uint8)
_SCALE_DTYPES = (torch.float8_e8m0fnu, torch.uint8)


def _check_mxfp4(packed: torch.Tensor, scale: torch.Tensor, what: str) -> None:
    require_dtype(packed, _PACKED_DTYPES, f"{what}(packed)")
    require_min_ndim(packed, 2, f"{what}(packed)")
    require_dtype(scale, _SCALE_DTYPES, f"{what}(scale)")
    inputs = packed.shape[-1] * 2
    if inputs % MXFP4_BLOCK:
        raise ValueError(
            f"{what}(packed): {inputs} inputs (2 per byte of shape {tuple(packed.shape)}) is not a multiple of "
            f"the MXFP4 block of {MXFP4_BLOCK}"
        )
    expected = (*packed.shape[:-1], inputs // MXFP4_BLOCK)
    require_shape(scale, expected, f"{what}(scale)", f"one UE8M0 byte per {MXFP4_BLOCK} inputs")


def mxfp4_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize [..., in] (in divisible by 32) to the release's MXFP4 layout: (packed int8 [..., in/2],
    UE8M0 scale as float8_e8m0fnu [..., in/32]).

    Block scale: the smallest power of two s with block_amax / s <= 6 (so nothing saturates); an
    all-zero block gets 2^-127 (byte 0). Elements: E2M1 round half to even of x / s.

    ModelOpt 0.47's ``MXFP4QTensor.quantize`` picks the same scales but rounds ties down and encodes 0
    as -0; its dequantized values differ from these only on exact ties (tests/formats/test_modelopt_qtensors.py).
    """
    require_dtype(w, FLOAT_DTYPES, "mxfp4_quantize(w)")
    require_min_ndim(w, 1, "mxfp4_quantize(w)")
    require_last_dim_multiple(
        w, MXFP4_BLOCK, "mxfp4_quantize(w)", f"one UE8M0 scale per {MXFP4_BLOCK} inputs"
    )
    require_finite(w, "mxfp4_quantize(w)")
    blocks = w.float().unflatten(-1, (-1, MXFP4_BLOCK))
    amax = blocks.abs().amax(dim=-1)
    # all-zero blocks: any scale works; take the smallest, 2^-127 (byte 0), as ModelOpt does
    descale = torch.where(amax > 0, amax / E2M1_MAX, 2.0**-127)
    scale = ue8m0_encode(descale, rounding="ceil", dtype=torch.float8_e8m0fnu)
    codes = e2m1_encode((blocks / ue8m0_decode(scale).unsqueeze(-1)).flatten(-2))
    return pack_nibbles(codes).view(torch.int8), scale


def mxfp4_dequantize(
    packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """[..., out, in/2] packed codes + [..., out, in/32] UE8M0 -> [..., out, in] in ``dtype``.

    Each value is an E2M1 value times a power of two, computed exactly in float32; the cast to bf16
    is exact too unless a value leaves bf16's normal range.
    """
    _check_mxfp4(packed, scale, "mxfp4_dequantize")
    if packed.device.type == "cpu" and dtype == torch.bfloat16 and packed.numel():
        # `dsv4 dequant`'s hot path: the arithmetic below, looked up per (scale byte, code byte)
        codes = packed.contiguous().view(torch.uint8).reshape(-1, MXFP4_BLOCK // 2)
        pairs = lookup_groups(codes, scale.contiguous().view(torch.uint8).reshape(-1), _bf16_pairs())
        return pairs.view(torch.bfloat16).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    return _dequantize_arith(packed, scale, dtype)


def _dequantize_arith(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # E2M1 value x power of two is exact in any format with float32's exponent range, so bf16 output
    # is computed in bf16 directly: the same bits as float32-then-cast, at half the memory traffic.
    compute = dtype if dtype in (torch.bfloat16, torch.float32) else torch.float32
    blocks = decode_packed(packed, compute).unflatten(-1, (-1, MXFP4_BLOCK))
    blocks.mul_(ue8m0_decode(scale, compute).unsqueeze(-1))
    return blocks.flatten(-2).to(dtype)


@functools.cache
def _bf16_pairs() -> np.ndarray:
    """The two BF16 values (as one int32, in memory order) of every (scale byte, packed byte) pair, by
    the arithmetic: row r holds table entries 16r..16r+15, which share scale byte 16r >> 8."""
    scale, code = pair_codes()
    rows = code.view(torch.int8).reshape(-1, MXFP4_BLOCK // 2)
    values = _dequantize_arith(rows, scale[:: MXFP4_BLOCK // 2].reshape(-1, 1), torch.bfloat16)
    return values.contiguous().view(torch.int32).reshape(-1).numpy()


def mxfp4_to_fp8_block(
    packed: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = (128, 128)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-encode a 2-D MXFP4 weight as FP8 with UE8M0 tile scales (float8_e4m3fn, float8_e8m0fnu).

    Exact whenever every nonzero value of a tile fits e4m3 under the tile's scale: the tile scale is
    2^(k-6) for the tile's largest block exponent k (6 * 2^6 = 384 <= 448), and e4m3 holds E2M1
    values times 2^d exactly for d down to -8 (its subnormals stop at 2^-9). So a tile is exact when
    its nonzero blocks' exponents span at most 14 octaves; a wider tile rounds its smallest values
    (round to nearest even, like any fp8_block_quantize).
    """
    _check_mxfp4(packed, scale, "mxfp4_to_fp8_block")
    if packed.ndim != 2:
        raise ValueError(f"mxfp4_to_fp8_block(packed): expected [out, in/2]; got shape {tuple(packed.shape)}")
    return fp8_block_quantize(mxfp4_dequantize(packed, scale, torch.float32), block, "ue8m0")
