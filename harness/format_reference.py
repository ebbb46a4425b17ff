"""Reference decoders and encoders written from the formats' definitions, bit by bit, for tests that
must not take their expected values from pipeline.formats (the code under test).

Slow and plain on purpose: every value is derived from the bit layout (sign, exponent, mantissa, bias),
not from a table copied from the code under test. Good for the few-thousand-element tensors of the
tests, not for checkpoints.
"""

from __future__ import annotations

import math

import torch

E4M3_MAX = 448.0  # 0x7E: exponent 15, mantissa 6 -> (1 + 6/8) * 2**8 (0x7F is NaN in e4m3fn)
FP8_TILE = 128


def e2m1_value(code: int) -> float:
    """E2M1: bit 3 sign, bits 2-1 exponent (bias 1), bit 0 mantissa; exponent 0 is subnormal (m * 0.5)."""
    sign = -1.0 if code & 0x8 else 1.0
    exponent, mantissa = (code >> 1) & 0x3, code & 0x1
    magnitude = mantissa * 0.5 if exponent == 0 else (1 + mantissa / 2) * 2.0 ** (exponent - 1)
    return sign * magnitude


def e4m3_value(byte: int) -> float:
    """float8_e4m3fn: bit 7 sign, bits 6-3 exponent (bias 7), bits 2-0 mantissa; exponent 0 subnormal
    (m/8 * 2**-6); 0x7F/0xFF are NaN (no infinities)."""
    sign = -1.0 if byte & 0x80 else 1.0
    exponent, mantissa = (byte >> 3) & 0xF, byte & 0x7
    if exponent == 0xF and mantissa == 0x7:
        return math.nan
    if exponent == 0:
        return sign * mantissa / 8 * 2.0**-6
    return sign * (1 + mantissa / 8) * 2.0 ** (exponent - 7)


def e8m0_value(byte: int) -> float:
    """UE8M0: an unsigned power of two, 2**(byte - 127); 0xFF is NaN."""
    return math.nan if byte == 0xFF else 2.0 ** (byte - 127)


def e4m3_values(t: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn tensor -> float64 values, each byte decoded by e4m3_value."""
    table = torch.tensor([e4m3_value(b) for b in range(256)], dtype=torch.float64)
    return table[t.view(torch.uint8).long()]


def e4m3_nearest(x: torch.Tensor) -> torch.Tensor:
    """The e4m3fn bytes nearest to ``x`` (round half to even mantissa, saturating at 448), from the
    definition: compare each |x| with all 127 non-negative finite code values, keep the closest, and
    on a tie the even code; the sign bit copies x's."""
    table = torch.tensor([e4m3_value(code) for code in range(0x7F)], dtype=torch.float64)
    magnitude = x.double().abs().clamp(max=E4M3_MAX).flatten()
    distance = (table[None, :] - magnitude[:, None]).abs()
    nearest = distance == distance.min(dim=1, keepdim=True).values
    odd = torch.arange(0x7F) % 2 == 1
    rank = nearest.to(torch.int64) * 2 + (nearest & ~odd).to(torch.int64)  # nearest, then even first
    codes = rank.argmax(dim=1).to(torch.uint8)
    sign = torch.signbit(x.flatten()).to(torch.uint8) << 7
    return (codes | sign).view(x.shape)


def nvfp4_values(packed: torch.Tensor, block_scale: torch.Tensor, global_scale: float) -> torch.Tensor:
    """NVFP4 [R, C/2] uint8 (element 2i in the low nibble) + [R, C/16] e4m3 + float32 global -> float32
    [R, C]: value = e2m1(code) * (block_scale * global), the scale product taken first in float32 as
    ModelOpt and vLLM take it."""
    codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2).long()
    e2m1 = torch.tensor([e2m1_value(c) for c in range(16)], dtype=torch.float32)[codes]
    e4m3 = torch.tensor([e4m3_value(b) for b in range(256)], dtype=torch.float32)
    block = e4m3[block_scale.view(torch.uint8).long()] * torch.tensor(global_scale, dtype=torch.float32)
    return e2m1 * block.repeat_interleave(16, dim=-1)


def fp8_block_values(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FP8 [R, C] e4m3fn with one UE8M0 scale per 128x128 tile -> float32 [R, C]."""
    e4m3 = torch.tensor([e4m3_value(b) for b in range(256)], dtype=torch.float32)
    e8m0 = torch.tensor([e8m0_value(b) for b in range(256)], dtype=torch.float32)
    values = e4m3[weight.view(torch.uint8).long()]
    tiles = e8m0[scale.view(torch.uint8).long()]
    tiles = tiles.repeat_interleave(FP8_TILE, 0)[: weight.shape[0]].repeat_interleave(FP8_TILE, 1)
    return values * tiles[:, : weight.shape[1]]


def fp8_block_codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's FP8 block quantization from its definition: per 128x128 tile, the scale is the
    smallest power of two s with amax / s <= 448 (UE8M0 byte 127 + log2 s; an all-zero tile gets 1) and
    each element is the e4m3 nearest to x / s. Returns (uint8 [R, C], uint8 [R/128, C/128])."""
    w = w.float()
    rows, cols = w.shape
    codes = torch.empty(rows, cols, dtype=torch.uint8)
    scales = torch.empty(math.ceil(rows / FP8_TILE), math.ceil(cols / FP8_TILE), dtype=torch.uint8)
    for ti in range(scales.shape[0]):
        for tj in range(scales.shape[1]):
            tile = w[ti * FP8_TILE : (ti + 1) * FP8_TILE, tj * FP8_TILE : (tj + 1) * FP8_TILE]
            amax = float(tile.abs().max())
            exponent = 0 if amax == 0 else math.ceil(math.log2(amax / E4M3_MAX))
            while amax / 2.0**exponent > E4M3_MAX:  # log2 rounding: enforce the definition
                exponent += 1
            while amax and amax / 2.0 ** (exponent - 1) <= E4M3_MAX:
                exponent -= 1
            scales[ti, tj] = 127 + exponent
            rows_, cols_ = (
                slice(ti * FP8_TILE, (ti + 1) * FP8_TILE),
                slice(tj * FP8_TILE, (tj + 1) * FP8_TILE),
            )
            codes[rows_, cols_] = e4m3_nearest(tile.double() / 2.0**exponent)
    return codes, scales
