"""MXFP4 (the release's experts) -> NVFP4 without re-rounding: same E2M1 codes, power-of-two scales.

MXFP4 stores E2M1 codes with one UE8M0 scale 2^k per 32 inputs; NVFP4 stores the same codes with an
e4m3 scale per 16 inputs times one float32 per tensor. Taking weight_scale_2 = 2^m and giving both
16-halves of a 32-block the e4m3 scale 2^(k-m) reproduces every value exactly, packed bytes unchanged,
as long as 2^(k-m) is a power of two e4m3 holds: k - m in [-9, 8] (2^-9 is e4m3's smallest subnormal,
2^8 its largest power of two). So a tensor with its own m transcodes exactly when its nonzero blocks'
exponents span at most 17 octaves. An expert's w1 and w3 share m (below), so for them the span is taken
over both tensors together: a w1 that spans 17 octaves alone is still re-encoded in part when w3's top
block lies higher.

Choice of m: m = k_max - 8, the largest block exponent at e4m3's largest power of two. A smaller m
would overflow the top block's scale; a larger one only narrows the window below. So it is the m that
keeps the most blocks exact, and blocks more than 17 octaves below k_max cannot be exact under any m
that keeps the top exact.
Those are re-encoded at the smallest scale, 2^-9 * 2^m, with E2M1 round-half-to-even: each is at least
2^17 times smaller than the tensor's largest block, and this is the closest NVFP4 can come to it given
m (no smaller block scale exists). All-zero blocks (codes 0 or 8) take scale 1 and stay ±0.

vLLM keeps w1's weight_scale_2 for the fused w13, so w1 and w3 of one expert must share m: compute it
with ``transcode_exponent(scale_w1, scale_w3)`` and pass it to both.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .e2m1 import decode_packed, e2m1_encode, pack_nibbles, unpack_nibbles
from .mxfp4 import MXFP4_BLOCK, _check_mxfp4
from .nvfp4 import NVFP4_BLOCK
from .ue8m0 import UE8M0_BIAS, UE8M0_NAN

E4M3_MIN_POW2, E4M3_MAX_POW2 = -9, 8  # 2^-9 .. 2^8: the powers of two float8_e4m3fn represents exactly
WINDOW = E4M3_MAX_POW2 - E4M3_MIN_POW2  # 17: the widest exponent spread that transcodes exactly


@dataclass(frozen=True)
class TranscodeReport:
    m: int  # weight_scale_2 == 2^m
    blocks: int  # 32-input MXFP4 blocks
    zero_blocks: int
    exact_blocks: int  # nonzero blocks copied exactly
    requantized_blocks: int  # nonzero blocks below the window, re-encoded at the smallest scale
    max_abs_error: float  # over the requantized blocks' elements (0 when exact)
    relative_error: float  # ||error|| / ||weight|| over the whole tensor

    @property
    def exact(self) -> bool:
        return self.requantized_blocks == 0


@functools.cache
def _pow2_e4m3(device: torch.device) -> torch.Tensor:
    """The e4m3 bytes of 2^-9 .. 2^8 (uint8 [18]): entry i is 2^(i - 9), each exact in e4m3."""
    exps = torch.arange(E4M3_MIN_POW2, E4M3_MAX_POW2 + 1, dtype=torch.float32)
    return torch.exp2(exps).to(torch.float8_e4m3fn).view(torch.uint8).to(device)


def _block_exponents(packed: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(k per 32-block as int32, mask of blocks holding a nonzero code)."""
    raw = scale.view(torch.uint8)
    if bool((raw == UE8M0_NAN).any()):
        raise ValueError("mxfp4_to_nvfp4(scale): UE8M0 byte 0xFF (NaN) in the block scales")
    k = raw.to(torch.int32) - UE8M0_BIAS
    return k, _nonzero_blocks(packed)


# The magnitude bits of both codes of a byte (sign bits 0x08, 0x80 cleared), in all 8 bytes of a word.
_MAGNITUDES_8 = 0x7777777777777777


def _nonzero_blocks(packed: torch.Tensor) -> torch.Tensor:
    """Mask [..., blocks] of the 32-input blocks holding a code other than ±0.

    A block is all ±0 iff each of its 16 bytes has no magnitude bit set (byte & 0x77 == 0), so the bytes
    are tested 8 at a time as int64 words, without unpacking nibbles (16x fewer elements than testing
    each code; tests/formats/test_transcode_speed_paths.py checks it against that for every byte value in
    every position)."""
    p = packed.contiguous().view(torch.uint8)
    blocks = p.unflatten(-1, (-1, MXFP4_BLOCK // 2))
    if p.storage_offset() % 8 == 0 and p.numel():
        words = blocks.view(torch.int64)  # [..., blocks, 2]: a block's 16 bytes as two words
        return ((words[..., 0] | words[..., 1]) & _MAGNITUDES_8).ne(0)
    return (blocks & 0x77).ne(0).any(dim=-1)  # a view that starts off an 8-byte boundary


def transcode_exponent(*scales_and_packed: tuple[torch.Tensor, torch.Tensor]) -> int:
    """m = k_max - 8 over every nonzero block of the given (packed, scale) pairs (w1 and w3 together);
    0 when every block is zero."""
    return _shared_exponent([_block_exponents(packed, scale) for packed, scale in scales_and_packed])


def _shared_exponent(exponents: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
    tops = [
        int(torch.where(nonzero, k, k.new_tensor(-(1 << 30))).max()) for k, nonzero in exponents if k.numel()
    ]
    top = max(tops, default=-(1 << 30))
    return 0 if top == -(1 << 30) else top - E4M3_MAX_POW2


def mxfp4_to_nvfp4(
    packed: torch.Tensor, scale: torch.Tensor, m: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, TranscodeReport]:
    """[..., out, in/2] int8 MXFP4 + [..., out, in/32] UE8M0 -> (packed uint8 [..., in/2], weight_scale
    e4m3 [..., in/16], weight_scale_2 float32 == 2^m, report). ``m`` defaults to transcode_exponent of
    this tensor alone; pass a shared one for w1/w3 (or transcode them with :func:`mxfp4_to_nvfp4_shared`).
    The packed codes returned share memory with ``packed`` where every block is exact."""
    _check_mxfp4(packed, scale, "mxfp4_to_nvfp4")
    exponents = _block_exponents(packed, scale)
    return _transcode(packed, *exponents, _shared_exponent([exponents]) if m is None else m)


def mxfp4_to_nvfp4_shared(
    *pairs: tuple[torch.Tensor, torch.Tensor],
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, TranscodeReport]]:
    """mxfp4_to_nvfp4 of each (packed, scale) pair under one m, transcode_exponent of them all (w1 and w3
    of an expert); each tensor's block exponents are found once."""
    for packed, scale in pairs:
        _check_mxfp4(packed, scale, "mxfp4_to_nvfp4")
    exponents = [_block_exponents(packed, scale) for packed, scale in pairs]
    m = _shared_exponent(exponents)
    return [
        _transcode(packed, k, nonzero, m) for (packed, _), (k, nonzero) in zip(pairs, exponents, strict=True)
    ]


def _transcode(
    packed: torch.Tensor, k: torch.Tensor, nonzero: torch.Tensor, m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, TranscodeReport]:
    rel = k - m  # block scale exponent relative to 2^m
    too_large = nonzero & (rel > E4M3_MAX_POW2)
    if bool(too_large.any()):
        raise ValueError(
            f"mxfp4_to_nvfp4: m={m} leaves block exponent {int(k[too_large].max())} above the e4m3 range "
            f"(k - m must be <= {E4M3_MAX_POW2}); use transcode_exponent() over every tensor sharing m"
        )
    below = nonzero & (rel < E4M3_MIN_POW2)
    # e4m3 block scales: 2^rel where exact, 2^-9 below the window, 1 for all-zero blocks; by table, from
    # the exponent clamped into the window (exactly what it is where exact, the window's floor below)
    block_exp = torch.where(nonzero, rel.clamp(E4M3_MIN_POW2, E4M3_MAX_POW2), 0)
    block_scale = _pow2_e4m3(packed.device)[block_exp - E4M3_MIN_POW2].view(torch.float8_e4m3fn)
    weight_scale = block_scale.repeat_interleave(MXFP4_BLOCK // NVFP4_BLOCK, dim=-1)
    weight_scale_2 = torch.tensor(2.0**m, dtype=torch.float32, device=packed.device)

    out = packed.view(torch.uint8)
    requantized = int(below.sum())
    nonzero_blocks = int(nonzero.sum())
    max_err, err_sq, total_sq = 0.0, 0.0, 0.0
    if requantized:
        # [..., blocks, 32]: the MXFP4 values, block by block. Only needed here: without a requantized
        # block the error is 0 and so is the relative error, whatever the weight's norm (it used to be
        # computed anyway, 8 bytes of float32 per packed byte, most of an exact transcode's time)
        values = decode_packed(packed).unflatten(-1, (-1, MXFP4_BLOCK)) * torch.exp2(k.float()).unsqueeze(-1)
        # re-encode only the blocks below the window: value / (2^-9 * 2^m), E2M1 round half to even
        step = 2.0 ** (E4M3_MIN_POW2 + m)
        codes = unpack_nibbles(out).unflatten(-1, (-1, MXFP4_BLOCK))  # a copy: packed stays as it was
        old_values = values[below]  # [n, 32]: the n blocks below the window
        new = e2m1_encode(old_values / step)  # [n, 32] codes
        codes[below] = new
        out = pack_nibbles(codes.flatten(-2))
        # [n, 32] - [n, 32], element by element: memory linear in n
        err = decode_packed(pack_nibbles(new)) * step - old_values
        max_err = float(err.abs().max())
        err_sq = float(err.double().pow(2).sum())
        total_sq = float(values.double().pow(2).sum())
    report = TranscodeReport(
        m=int(m),
        blocks=int(k.numel()),
        zero_blocks=int(k.numel()) - nonzero_blocks,
        exact_blocks=nonzero_blocks - requantized,
        requantized_blocks=requantized,
        max_abs_error=max_err,
        relative_error=(err_sq / total_sq) ** 0.5 if total_sq else 0.0,
    )
    return out, weight_scale, weight_scale_2, report
