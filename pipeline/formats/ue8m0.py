"""UE8M0: an unsigned power-of-two scale in one byte (byte e means 2^(e-127); 0xFF is NaN).

torch stores it as float8_e8m0fnu. Numeric casts into that dtype round and saturate, so this module
moves bytes with views only: uint8 <-> float8_e8m0fnu never changes a byte.
"""

from __future__ import annotations

import torch

from ._checks import FLOAT_DTYPES, require_dtype

UE8M0_BIAS = 127
UE8M0_NAN = 0xFF
MIN_EXPONENT = -127  # byte 0: 2^-127, a float32 subnormal
MAX_EXPONENT = 127  # byte 254

_BYTE_DTYPES = (torch.uint8, torch.float8_e8m0fnu)
_ROUNDINGS = ("exact", "ceil")


def ue8m0_encode(
    x: torch.Tensor, *, rounding: str = "exact", dtype: torch.dtype = torch.uint8
) -> torch.Tensor:
    """Encode positive scales as UE8M0 bytes.

    rounding="exact": every value must be a power of two 2^k with k in [-127, 127] (or NaN -> 0xFF).
    rounding="ceil": the smallest power of two >= x (DeepSeek's UE8M0 scale rule), k clamped up to -127.
    dtype: torch.uint8 (the bytes) or torch.float8_e8m0fnu (the same bytes, viewed).
    """
    require_dtype(x, FLOAT_DTYPES, "ue8m0_encode(x)")
    if rounding not in _ROUNDINGS:
        raise ValueError(f"ue8m0_encode: rounding must be one of {_ROUNDINGS}; got {rounding!r}")
    if dtype not in _BYTE_DTYPES:
        raise ValueError(f"ue8m0_encode: dtype must be torch.uint8 or torch.float8_e8m0fnu; got {dtype}")
    xf = x.float()
    nan = torch.isnan(xf)
    bad = ~nan & ~(torch.isfinite(xf) & (xf > 0))
    if bool(bad.any()):
        where = bad.nonzero()[0].tolist()
        raise ValueError(
            f"ue8m0_encode: UE8M0 holds positive finite powers of two (or NaN); got {xf[tuple(where)].item()} "
            f"at index {where}"
        )
    mantissa, exponent = torch.frexp(torch.where(nan, torch.ones_like(xf), xf))  # x = m * 2^e, m in [0.5, 1)
    is_power_of_two = mantissa == 0.5
    k = exponent - 1 if rounding == "exact" else torch.where(is_power_of_two, exponent - 1, exponent)
    if rounding == "exact":
        inexact = ~is_power_of_two & ~nan
        if bool(inexact.any()):
            where = inexact.nonzero()[0].tolist()
            raise ValueError(
                f"ue8m0_encode(rounding='exact'): {xf[tuple(where)].item()} at index {where} is not a power of "
                "two; pass rounding='ceil' to round scales up"
            )
    else:
        k = k.clamp(min=MIN_EXPONENT)
    out_of_range = ~nan & ((k < MIN_EXPONENT) | (k > MAX_EXPONENT))
    if bool(out_of_range.any()):
        where = out_of_range.nonzero()[0].tolist()
        raise ValueError(
            f"ue8m0_encode: 2^{int(k[tuple(where)])} at index {where} is outside UE8M0's range "
            f"2^{MIN_EXPONENT}..2^{MAX_EXPONENT}"
        )
    byte = torch.where(nan, UE8M0_NAN, k + UE8M0_BIAS).to(torch.uint8)
    return byte.view(dtype) if dtype is not torch.uint8 else byte


def ue8m0_decode(b: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode UE8M0 bytes (uint8 or float8_e8m0fnu) to ``dtype``: 2^(e-127) exactly, NaN for 0xFF."""
    require_dtype(b, _BYTE_DTYPES, "ue8m0_decode(b)")
    e = b.view(torch.uint8).to(torch.int32)
    # Build the float32 bit pattern directly: exponent field e, zero mantissa. Byte 0 (2^-127) is the
    # subnormal 0x00400000 and byte 255 is a quiet NaN.
    bits = torch.where(e == 0, 0x00400000, e << 23)
    bits = torch.where(e == UE8M0_NAN, 0x7FC00000, bits)
    return bits.view(torch.float32).to(dtype)


def ue8m0_products_finite(scale: torch.Tensor, element_max: float, dtype: torch.dtype) -> bool:
    """Whether every product of an element of magnitude <= ``element_max`` with a scale of ``scale`` is
    finite in ``dtype``: True proves it without computing a product; False means one may not be.

    Dequantization's products are elements times powers of two (E2M1 values up to 6, e4m3 up to 448),
    exact in bf16, float16 and float32 whenever they do not overflow, so only the largest scale byte
    decides: a product overflows iff ``element_max * 2^(byte - 127)`` exceeds the dtype's largest finite
    value (or the byte is 0xFF, NaN). One pass over the scale bytes (1/16 to 1/16384 of the elements)
    replaces a pass over every output value; tests/formats/test_products_finite.py checks the bound
    against the real products for every scale byte and every element code.
    """
    require_dtype(scale, _BYTE_DTYPES, "ue8m0_products_finite(scale)")
    if scale.numel() == 0:
        return True
    top = int(scale.view(torch.uint8).max())
    if top == UE8M0_NAN:
        return False
    return element_max * 2.0 ** (top - UE8M0_BIAS) <= torch.finfo(dtype).max


def as_e8m0(b: torch.Tensor) -> torch.Tensor:
    """View UE8M0 bytes as torch.float8_e8m0fnu (the dtype safetensors writes as F8_E8M0)."""
    require_dtype(b, _BYTE_DTYPES, "as_e8m0(b)")
    return b.view(torch.float8_e8m0fnu)
