"""NVFP4 as ModelOpt 0.47 exports it: E2M1 codes packed two per uint8 ([out, in/2]), one
float8_e4m3fn scale per 16 inputs (``weight_scale``, [out, in/16]) and one float32 per tensor
(``weight_scale_2``).

The arithmetic is ModelOpt's ``NVFP4QTensor.quantize`` step for step, so the bytes match:
    weight_scale_2 = amax / (6 * 448)
    block scale    = block_amax / (6 * weight_scale_2), 0 -> 1, clamped to [2^-9, 448], cast to e4m3
    element        = E2M1 round-half-even of x / (block_scale * weight_scale_2), saturating at 6
Dequantization multiplies each code's value by (block_scale * weight_scale_2), that product taken
first in float32, as ModelOpt's ``dequantize`` and vLLM's ``dequantize_to_dtype`` both do.
"""

from __future__ import annotations

import torch

from ._checks import (
    FLOAT_DTYPES,
    require_dtype,
    require_finite_maxima,
    require_last_dim_multiple,
    require_min_ndim,
    require_shape,
)
from .e2m1 import E2M1_MAX, decode_packed, e2m1_encode, pack_nibbles
from .fp8_block import FP8_E4M3_MAX

NVFP4_BLOCK = 16
MIN_BLOCK_SCALE = 2.0**-9  # smallest e4m3 subnormal: ModelOpt clamps here so no block scale is 0


def nvfp4_global_scale(amax: torch.Tensor | float) -> torch.Tensor:
    """weight_scale_2 (or input_scale) for an absolute maximum: amax / (6 * 448), float32."""
    amax = torch.as_tensor(amax).float()
    # divided by a tensor on amax's device, not by a Python number: CUDA divides a tensor by a number as
    # a product with its float32 reciprocal, which differs from the quotient for about one amax in five
    # (then `convert RELEASE --amax` on CUDA wrote other bytes than on the CPU)
    return amax / torch.full((), E2M1_MAX * FP8_E4M3_MAX, dtype=torch.float32, device=amax.device)


def nvfp4_quantize(
    w: torch.Tensor,
    amax: torch.Tensor | float | None = None,
    weight_scale_2: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize [..., in] (in divisible by 16) to (packed uint8 [..., in/2], weight_scale e4m3
    [..., in/16], weight_scale_2 float32 scalar).

    weight_scale_2 defaults to ``amax / 2688`` with amax the tensor's absolute maximum; pass ``amax``
    (a calibrated or shared value) or ``weight_scale_2`` itself to override it, e.g. to give w1 and w3
    of one expert the same global scale.
    """
    require_dtype(w, FLOAT_DTYPES, "nvfp4_quantize(w)")
    require_min_ndim(w, 1, "nvfp4_quantize(w)")
    require_last_dim_multiple(w, NVFP4_BLOCK, "nvfp4_quantize(w)", f"one e4m3 scale per {NVFP4_BLOCK} inputs")
    blocks = w.unflatten(-1, (-1, NVFP4_BLOCK))
    block_amax = blocks.abs().amax(dim=-1).float()
    require_finite_maxima(block_amax, w, "nvfp4_quantize(w)")
    if amax is not None and weight_scale_2 is not None:
        raise ValueError("nvfp4_quantize: pass amax or weight_scale_2, not both")
    if weight_scale_2 is None:
        # the tensor's amax is the largest block amax (exact: a float32 copy of an input value)
        weight_scale_2 = nvfp4_global_scale(block_amax.amax() if amax is None else amax)
    wsf2 = torch.as_tensor(weight_scale_2, device=w.device).float().reshape(())
    if not bool(torch.isfinite(wsf2)) or float(wsf2) <= 0:
        raise ValueError(
            f"nvfp4_quantize: weight_scale_2 must be finite and positive; got {float(wsf2)} "
            "(an all-zero tensor or amax of 0 has no NVFP4 global scale; ModelOpt 0.47 writes NaN scales here)"
        )
    block_scale = block_amax / (E2M1_MAX * wsf2)
    block_scale = torch.where(block_scale == 0, 1.0, block_scale)
    weight_scale = block_scale.clamp(min=MIN_BLOCK_SCALE, max=FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    scaled = blocks / (weight_scale.float() * wsf2).unsqueeze(-1)
    # ModelOpt takes the sign from `x < 0`, so an input -0.0 encodes as +0; adding +0.0 turns -0.0 into
    # +0.0 and leaves every other value alone (negatives that round to zero still get code 8).
    codes = e2m1_encode(scaled.flatten(-2) + 0.0)
    return pack_nibbles(codes), weight_scale, wsf2


def nvfp4_dequantize(
    packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_scale_2: torch.Tensor | float,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """[..., in/2] uint8 + [..., in/16] e4m3 + float32 scalar -> [..., in] in ``dtype``."""
    require_dtype(packed, (torch.uint8,), "nvfp4_dequantize(packed)")
    require_min_ndim(packed, 1, "nvfp4_dequantize(packed)")
    require_dtype(weight_scale, (torch.float8_e4m3fn,), "nvfp4_dequantize(weight_scale)")
    inputs = packed.shape[-1] * 2
    if inputs % NVFP4_BLOCK:
        raise ValueError(
            f"nvfp4_dequantize(packed): {inputs} inputs is not a multiple of the NVFP4 block of {NVFP4_BLOCK}"
        )
    expected = (*packed.shape[:-1], inputs // NVFP4_BLOCK)
    require_shape(
        weight_scale, expected, "nvfp4_dequantize(weight_scale)", f"one e4m3 per {NVFP4_BLOCK} inputs"
    )
    wsf2 = torch.as_tensor(weight_scale_2, device=packed.device).float()
    if wsf2.numel() != 1:
        raise ValueError(
            f"nvfp4_dequantize(weight_scale_2): expected one value; got shape {tuple(wsf2.shape)}"
        )
    values = decode_packed(packed).unflatten(-1, (-1, NVFP4_BLOCK))
    # float32 throughout: block scale x global scale is not a power of two, so the order and precision
    # of the products decide the bits (ModelOpt and vLLM take the scale product first).
    values.mul_((weight_scale.float() * wsf2.reshape(())).unsqueeze(-1))
    return values.flatten(-2).to(dtype)


def nvfp4_rescale(
    weight_scale: torch.Tensor, weight_scale_2: torch.Tensor | float, new_weight_scale_2: torch.Tensor | float
) -> torch.Tensor:
    """Block scales re-expressed against another global scale, codes unchanged: the e4m3 nearest to
    ``weight_scale * weight_scale_2 / new_weight_scale_2`` (round half to even, saturating at 448).

    For fixed codes this is the block scale with the least error: the dequantized block is
    codes * block_scale * global, so its error is |block_scale - exact| times the codes' norm, smallest
    at the nearest representable scale. Exact where the ratio of the global scales is a power of two
    and the result stays in e4m3's range; unchanged (the same bytes) when the global scale is.
    Used to give w1 and w3 of one expert one weight_scale_2, as vLLM's fused w13 needs.
    """
    require_dtype(weight_scale, (torch.float8_e4m3fn,), "nvfp4_rescale(weight_scale)")
    old = torch.as_tensor(weight_scale_2, device=weight_scale.device).float().reshape(())
    new = torch.as_tensor(new_weight_scale_2, device=weight_scale.device).float().reshape(())
    for name, v in (("weight_scale_2", old), ("new_weight_scale_2", new)):
        if not bool(torch.isfinite(v)) or float(v) <= 0:
            raise ValueError(f"nvfp4_rescale({name}): must be finite and positive; got {float(v)}")
    if bool(old == new):
        return weight_scale.clone()
    scaled = weight_scale.float() * old / new
    return scaled.clamp(max=FP8_E4M3_MAX).to(torch.float8_e4m3fn)
