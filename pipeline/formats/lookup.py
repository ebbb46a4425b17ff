"""Dequantization on the CPU by table lookup: one precomputed result per (scale byte, code byte) pair.

A value of a UE8M0-scaled format depends on two bytes only: its scale's and its code byte's (a pair of
E2M1 codes for MXFP4, one e4m3 for FP8). So all 65,536 results can be computed once, by the format's own
arithmetic (the caller passes that table in), and each output element then costs one 16-bit index and
one lookup. On a CPU that is 3-5x faster than decoding and multiplying (bench/formats.py), and it is the
same bits by construction: the table *is* the arithmetic's output (tests/formats/test_lookup_exhaustive.py
checks every pair, and random tensors, against it).

The work goes in chunks of about CHUNK code bytes, so the 16-bit indices stay in cache instead of being
a temporary as large as the output; numpy's ``take`` with ``mode="clip"`` writes into the output without
an intermediate buffer (a 16-bit index never reaches past a 65,536-entry table, so nothing is clipped),
and both it and the index arithmetic release the GIL, so converter threads run it in parallel.
"""

from __future__ import annotations

import numpy as np
import torch

CHUNK = 1 << 17  # code bytes per step: indices (2 B each) and results stay within a server core's L2, and
# each step's work is long beside the GIL-held call around it, which converter threads take in turn
TABLE_SIZE = 1 << 16  # (scale byte << 8) | code byte


def pair_codes() -> tuple[torch.Tensor, torch.Tensor]:
    """Every (scale byte, code byte) pair in table order: (scale bytes [65536], code bytes [65536]),
    uint8, entry i = (i >> 8, i & 0xFF). A format evaluates its own arithmetic on these to make its table."""
    i = torch.arange(TABLE_SIZE, dtype=torch.int32)
    return (i >> 8).to(torch.uint8), (i & 0xFF).to(torch.uint8)


def lookup_groups(codes: torch.Tensor, scales: torch.Tensor, table: np.ndarray) -> torch.Tensor:
    """``table[(scale << 8) | code]`` for codes [n, w] uint8 whose row i is scaled by scales[i] (uint8 [n]):
    MXFP4, where each row is one 32-input block's 16 bytes. Returns [n, w] of the table's dtype, on the CPU."""
    c = codes.numpy()
    s = scales.numpy().reshape(-1, 1)
    out = np.empty(c.shape, dtype=table.dtype)
    rows = max(1, CHUNK // max(1, c.shape[1]))
    index = np.empty((min(rows, c.shape[0]), c.shape[1]), dtype=np.uint16)
    for i in range(0, c.shape[0], rows):
        part = index[: min(rows, c.shape[0] - i)]
        part[...] = s[i : i + rows]  # widened to 16 bits first (a uint8 shift would drop the byte)
        part <<= 8
        part |= c[i : i + rows]
        np.take(table, part, out=out[i : i + rows], mode="clip")
    return torch.from_numpy(out)


def lookup_tiles(codes: torch.Tensor, scales: torch.Tensor, block: tuple[int, int], table: np.ndarray):
    """``table[(scale << 8) | code]`` for codes [R, C] uint8 tiled by ``block`` with scales [ceil(R/br),
    ceil(C/bc)] uint8 (FP8 block), partial edge tiles included. Returns [R, C] of the table's dtype."""
    c = codes.numpy()
    s = scales.numpy()
    br, bc = block
    rows_total, cols = c.shape
    out = np.empty(c.shape, dtype=table.dtype)
    rows = max(1, min(br, CHUNK // max(1, cols)))
    index = np.empty((min(rows, rows_total), cols), dtype=np.uint16)
    column_scale = np.empty(cols, dtype=np.uint16)
    for tile_row in range(s.shape[0]):
        # the scale byte of each column in this row of tiles, shifted into the index's high byte
        column_scale[...] = np.repeat(s[tile_row], bc)[:cols]
        column_scale <<= 8
        for i in range(tile_row * br, min((tile_row + 1) * br, rows_total), rows):
            n = min(rows, (tile_row + 1) * br - i, rows_total - i)
            part = index[:n]
            np.bitwise_or(c[i : i + n], column_scale, out=part, casting="unsafe")
            np.take(table, part, out=out[i : i + n], mode="clip")
    return torch.from_numpy(out)
