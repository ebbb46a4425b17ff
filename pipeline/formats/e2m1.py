"""E2M1 (FP4): the element format of MXFP4 and NVFP4, and the nibble packing both use.

A code is 4 bits: bit 3 is the sign, bits 0-2 index the magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6.
Two codes share a byte with element 2i in the low nibble and 2i+1 in the high nibble; the DeepSeek
release, ModelOpt 0.47 (NVFP4QTensor, MXFP4QTensor) and vLLM's break_fp4_bytes all agree on that.
"""

from __future__ import annotations

import functools

import torch

from ._checks import FLOAT_DTYPES, require_codes, require_dtype, require_last_dim_multiple, require_min_ndim

E2M1_MAGNITUDES: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = 6.0
# Midpoints between neighbouring magnitudes. A value exactly on one is a tie and rounds to the
# neighbour whose code is even (round half to even on the 1-bit mantissa): 0.25->0, 0.75->1,
# 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4.
E2M1_MIDPOINTS: tuple[float, ...] = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
# The ties whose lower neighbour has an odd code, so that rounding goes up: 0.75, 1.75, 3.5.
_TIES_ROUNDING_UP: tuple[float, ...] = E2M1_MIDPOINTS[1::2]
E2M1_SIGN_BIT = 0x8


# The tables below are made once per device (and dtype), on the CPU, then copied with a blocking copy: a
# table still being made on one converter thread's CUDA stream must not be read from another's. Made per
# call they were a dozen tiny kernels and a synchronizing host-to-device copy each time, most of what a
# small tensor's decode cost on CUDA.
@functools.cache
def _lut(device: torch.device) -> torch.Tensor:
    # All 16 codes; code 8 is -0.0, so the sign of zero survives decoding.
    mags = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float32)
    return torch.cat([mags, -mags]).to(device)


@functools.cache
def _byte_values(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[256, 2]: the two values of every packed byte (low nibble first), in ``dtype``."""
    every_byte = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    return _lut(torch.device("cpu"))[unpack_nibbles(every_byte).int()].to(dtype).view(256, 2).to(device)


@functools.cache
def _midpoints(device: torch.device) -> torch.Tensor:
    return torch.tensor(E2M1_MIDPOINTS, dtype=torch.float32).to(device)


def decode_packed(packed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """unpack_nibbles + e2m1_decode in one table lookup per byte: [..., n] bytes -> [..., 2n] values.

    The hot path of every FP4 dequantization: one 256x2 table indexed by the byte, which on a CPU runs
    about twice as fast as unpacking and decoding the nibbles separately.
    """
    require_dtype(packed, (torch.uint8, torch.int8), "decode_packed(packed)")
    require_min_ndim(packed, 1, "decode_packed(packed)")
    table = _byte_values(packed.device, dtype)
    return torch.nn.functional.embedding(packed.view(torch.uint8).long(), table).flatten(-2)


@functools.cache
def _byte_square_sums(device: torch.device) -> torch.Tensor:
    """[256] float32: v(low nibble)^2 + v(high nibble)^2 of every packed byte."""
    return _byte_values(torch.device("cpu"), torch.float32).pow(2).sum(-1).to(device)


def block_square_sums(packed: torch.Tensor, block: int) -> torch.Tensor:
    """The sum of squared E2M1 values over each ``block`` codes: packed bytes [..., n/2] -> [..., n/block]
    float32, on the input's device. The same numbers as ``decode_packed(packed)`` squared and summed per
    block (every square is a multiple of 1/4 up to 36, so every sum here is exact in float32, in any
    order), from one table lookup per byte instead of 8 bytes of float32 per packed byte."""
    require_dtype(packed, (torch.uint8, torch.int8), "block_square_sums(packed)")
    require_min_ndim(packed, 1, "block_square_sums(packed)")
    require_last_dim_multiple(packed, block // 2, "block_square_sums(packed)", f"whole {block}-code blocks")
    raw = packed.contiguous().view(torch.uint8)
    table = _byte_square_sums(raw.device)
    # on the CPU, numpy indexes by the uint8 bytes themselves, with the GIL released
    on_cpu = raw.device.type == "cpu"
    squares = torch.from_numpy(table.numpy()[raw.numpy()]) if on_cpu else table[raw.long()]
    return squares.unflatten(-1, (-1, block // 2)).sum(-1)


def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """Round each element to the nearest E2M1 value (ties to even) and return its 4-bit code as uint8.

    Magnitudes above 6 saturate to 6 (code 7 or 15); -0.0 and negatives that round to zero keep their
    sign (code 8). NaN has no E2M1 encoding and is an error.
    """
    require_dtype(x, FLOAT_DTYPES, "e2m1_encode(x)")
    xf = x.float()
    if bool(torch.isnan(xf).any()):
        raise ValueError("e2m1_encode(x): E2M1 has no NaN; the input holds NaN values")
    mag = xf.abs()
    bounds = _midpoints(x.device)
    # searchsorted (left) counts the midpoints strictly below |x|: a tie rounds down ...
    code = torch.searchsorted(bounds, mag, out_int32=True).to(torch.uint8)
    # ... which is right for ties whose lower neighbour is even; the other three round up.
    for tie in _TIES_ROUNDING_UP:
        code += (mag == tie).to(torch.uint8)
    code |= torch.signbit(xf).to(torch.uint8) << 3
    return code


def e2m1_decode(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Map uint8 codes (0..15) to their E2M1 values in ``dtype`` (every E2M1 value is exact in bf16)."""
    require_codes(codes, "e2m1_decode(codes)")
    return _lut(codes.device)[codes.int()].to(dtype)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack pairs of 4-bit codes along the last dimension: element 2i low nibble, 2i+1 high nibble."""
    require_codes(codes, "pack_nibbles(codes)")
    require_min_ndim(codes, 1, "pack_nibbles(codes)")
    require_last_dim_multiple(
        codes, 2, "pack_nibbles(codes)", "two codes per byte; odd lengths are not padded"
    )
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_nibbles. Accepts uint8, or int8 as the DeepSeek release stores experts."""
    require_dtype(packed, (torch.uint8, torch.int8), "unpack_nibbles(packed)")
    require_min_ndim(packed, 1, "unpack_nibbles(packed)")
    p = packed.view(torch.uint8)
    return torch.stack((p & 0x0F, p >> 4), dim=-1).flatten(-2)
