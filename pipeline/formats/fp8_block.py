"""FP8 block quantization: float8_e4m3fn elements with one scale per 128x128 tile of a 2-D weight.

This is how DeepSeek V4 ships attention, shared experts, indexer wq_b and MTP projections (scale key
``<name>.scale``, UE8M0). Shapes need not divide by the tile: edge tiles are partial.

The arithmetic follows transformers' ``Fp8Quantize`` (integrations/finegrained_fp8, 5.23) so that the
two agree byte for byte: per tile ``inv = 1 / (448 / amax)`` is the stored scale and the tile is
multiplied by ``448 / amax``; an all-zero tile gets scale 1. With UE8M0 scales the stored scale is
rounded up to a power of two first (exactly, from the float's exponent bits) and the tile is divided
by it, which is exact.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from ._checks import FLOAT_DTYPES, require_dtype, require_finite_maxima, require_ndim, require_shape
from .lookup import lookup_tiles, pair_codes
from .ue8m0 import ue8m0_decode, ue8m0_encode

FP8_E4M3_MAX = 448.0
SCALE_FORMATS = ("ue8m0", "float32")
# Large weights are quantized in strips of whole tile rows: tiles are independent, so the bytes are the
# same, and float32 temporaries of ~8 M elements are reused by the allocator instead of being fresh
# pages of hundreds of MB each (measured on this CPU: 2.5-3x faster per thread, most time had been
# page faults in the kernel).
STRIP_ELEMENTS = 8 * 1024 * 1024
_SCALE_DTYPES = (torch.float8_e8m0fnu, torch.uint8, torch.float32)


def _check_block(block: tuple[int, int]) -> tuple[int, int]:
    if len(block) != 2 or any(int(b) <= 0 for b in block):
        raise ValueError(f"block must be two positive ints (rows, cols); got {block!r}")
    return int(block[0]), int(block[1])


def tile_grid(shape: tuple[int, int], block: tuple[int, int] = (128, 128)) -> tuple[int, int]:
    """Number of (row, col) tiles covering ``shape``, partial edge tiles included."""
    br, bc = _check_block(block)
    return -(-shape[0] // br), -(-shape[1] // bc)


def _to_tiles(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """[R, C] -> [TR, br, TC, bc], zero-padding partial edge tiles (zeros leave a tile's amax alone)."""
    br, bc = block
    rows, cols = x.shape
    tr, tc = tile_grid((rows, cols), block)
    if (tr * br, tc * bc) != (rows, cols):
        x = torch.nn.functional.pad(x, (0, tc * bc - cols, 0, tr * br - rows))
    return x.reshape(tr, br, tc, bc)


def _from_tiles(tiles: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    tr, br, tc, bc = tiles.shape
    full = tiles.reshape(tr * br, tc * bc)
    return full if tuple(full.shape) == tuple(shape) else full[: shape[0], : shape[1]].contiguous()


def fp8_block_quantize(
    w: torch.Tensor, block: tuple[int, int] = (128, 128), scale_fmt: str = "ue8m0"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D float weight to (float8_e4m3fn [R, C], scale [ceil(R/br), ceil(C/bc)]).

    scale_fmt="ue8m0": scale as float8_e8m0fnu (powers of two, as DeepSeek ships them);
    scale_fmt="float32": scale as float32. Dequantize with fp8_block_dequantize.
    """
    require_dtype(w, FLOAT_DTYPES, "fp8_block_quantize(w)")
    require_ndim(w, 2, "fp8_block_quantize(w)", "[rows, cols]")
    if scale_fmt not in SCALE_FORMATS:
        raise ValueError(f"fp8_block_quantize: scale_fmt must be one of {SCALE_FORMATS}; got {scale_fmt!r}")
    block = _check_block(block)
    strip = max(1, STRIP_ELEMENTS // (max(1, w.shape[1]) * block[0])) * block[0]
    if w.shape[0] > strip:
        parts = [_quantize(w[i : i + strip], block, scale_fmt, w) for i in range(0, w.shape[0], strip)]
        return torch.cat([q for q, _ in parts]), torch.cat([sc for _, sc in parts])
    return _quantize(w, block, scale_fmt, w)


def _quantize(
    part: torch.Tensor, block: tuple[int, int], scale_fmt: str, whole: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    tiles = _to_tiles(part.float(), block)
    amax = tiles.abs().amax(dim=(1, 3))
    require_finite_maxima(amax, whole, "fp8_block_quantize(w)")
    nonzero = amax > 0
    forward = torch.where(nonzero, FP8_E4M3_MAX / torch.where(nonzero, amax, 1.0), 1.0)
    inverse = 1.0 / forward
    if scale_fmt == "ue8m0":
        scale = ue8m0_encode(inverse, rounding="ceil", dtype=torch.float8_e8m0fnu)
        forward = 1.0 / ue8m0_decode(scale)  # exact: a power of two
    else:
        scale = inverse
    scaled = tiles * forward[:, None, :, None]
    q = scaled.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return _from_tiles(q, tuple(part.shape)), scale


def fp8_block_dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    block: tuple[int, int] = (128, 128),
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Dequantize: each tile of ``q`` times its scale, in float32, then cast to ``dtype``.

    ``scale`` may be float8_e8m0fnu or uint8 (UE8M0 bytes) or float32; its shape must be the tile grid.
    """
    require_dtype(q, (torch.float8_e4m3fn,), "fp8_block_dequantize(q)")
    require_ndim(q, 2, "fp8_block_dequantize(q)", "[rows, cols]")
    require_dtype(scale, _SCALE_DTYPES, "fp8_block_dequantize(scale)")
    block = _check_block(block)
    grid = tile_grid(tuple(q.shape), block)
    require_shape(
        scale, grid, "fp8_block_dequantize(scale)", f"one per {block[0]}x{block[1]} tile of {tuple(q.shape)}"
    )
    if q.device.type == "cpu" and dtype == torch.bfloat16 and scale.dtype != torch.float32:
        # `dsv4 dequant`'s path for attention: the arithmetic below, looked up per (scale, e4m3) byte pair
        codes, tiles = q.contiguous().view(torch.uint8), scale.contiguous().view(torch.uint8)
        return lookup_tiles(codes, tiles, block, _bf16_values()).view(torch.bfloat16)
    return _dequantize_arith(q, scale, block, dtype)


@functools.cache
def _bf16_values() -> np.ndarray:
    """The BF16 value (as int16) of every (UE8M0 scale byte, e4m3 byte) pair, by the arithmetic: one
    row of 128-column tiles, tile t holding entries 128t..128t+127, which share scale byte 128t >> 8."""
    scale, code = pair_codes()
    q = code.view(torch.float8_e4m3fn).reshape(1, -1)
    values = _dequantize_arith(q, scale[::128].reshape(1, -1), (128, 128), torch.bfloat16)
    return values.contiguous().view(torch.int16).reshape(-1).numpy()


def _dequantize_arith(
    q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    if scale.dtype == torch.float32 or dtype not in (torch.bfloat16, torch.float32):
        compute, s = torch.float32, scale.float() if scale.dtype == torch.float32 else ue8m0_decode(scale)
    else:
        # e4m3 value x power of two is exact in bf16 (same exponent range as float32), so UE8M0 tiles
        # are scaled in the output dtype directly: the same bits as float32-then-cast, less traffic.
        compute, s = dtype, ue8m0_decode(scale, dtype)
    tiles = _to_tiles(q.to(compute), block)
    tiles.mul_(s[:, None, :, None])
    return _from_tiles(tiles, tuple(q.shape)).to(dtype)
