"""The MXFP4 -> NVFP4 transcode's report on blocks below the e4m3 window: right figures (its memory: tests/formats/test_transcode_report_memory.py).

The expected errors are derived here from the bytes alone: both formats decoded with plain Python
loops over the nibbles (E2M1 table, UE8M0 2^(e-127), e4m3 block scale times the float32 global scale),
compared in float64. Nothing of pipeline.formats decodes the reference.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.formats import mxfp4_to_nvfp4

pytestmark = pytest.mark.unit

E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
BLOCK = 32  # MXFP4: one UE8M0 per 32 inputs
NV_BLOCK = 16  # NVFP4: one e4m3 per 16 inputs


def _code_value(code: int) -> float:
    return -E2M1[code & 7] if code & 8 else E2M1[code & 7]


def _nibbles(byte: int) -> tuple[int, int]:
    return byte & 0x0F, byte >> 4  # element 2i in the low nibble, 2i+1 in the high one


def _decode_mxfp4(packed: torch.Tensor, scale: torch.Tensor) -> np.ndarray:
    p = packed.view(torch.uint8).numpy()
    s = scale.view(torch.uint8).numpy()
    out = np.zeros((p.shape[0], p.shape[1] * 2))
    for r in range(p.shape[0]):
        for j in range(p.shape[1]):
            for half, code in enumerate(_nibbles(int(p[r, j]))):
                col = 2 * j + half
                out[r, col] = _code_value(code) * 2.0 ** (int(s[r, col // BLOCK]) - 127)
    return out


def _decode_nvfp4(packed: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor) -> np.ndarray:
    p = packed.view(torch.uint8).numpy()
    bs = block_scale.float().numpy().astype(np.float64)  # e4m3 -> float: exact
    g = float(global_scale)
    out = np.zeros((p.shape[0], p.shape[1] * 2))
    for r in range(p.shape[0]):
        for j in range(p.shape[1]):
            for half, code in enumerate(_nibbles(int(p[r, j]))):
                col = 2 * j + half
                out[r, col] = _code_value(code) * bs[r, col // NV_BLOCK] * g
    return out


def _blocks(exponents: list[int], rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, 32 * len(exponents)] MXFP4 with random nonzero codes and the given block exponents."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (rows, BLOCK * len(exponents)), generator=g, dtype=torch.uint8)
    codes[:, ::BLOCK] = 7  # every block holds a 6, so none is all zero
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).view(torch.int8)
    scale = torch.tensor([[k + 127 for k in exponents]] * rows, dtype=torch.uint8).view(torch.float8_e8m0fnu)
    return packed, scale


def test_relative_and_max_error_match_an_independent_decode():
    """Several blocks far below the window, each with other values: the old report subtracted an
    [n, 1, 32] tensor from an [n, 32] one and printed the error of every block against every other."""
    top = 10  # m = top - 8; blocks below m - 9 = top - 17 are re-encoded
    exponents = [top, top - 20, top - 21, top - 19, top - 30, top - 5]
    packed, scale = _blocks(exponents, rows=3, seed=7)
    q, ws, ws2, report = mxfp4_to_nvfp4(packed, scale)

    source = _decode_mxfp4(packed, scale)
    result = _decode_nvfp4(q, ws, ws2)
    err = result - source
    assert report.requantized_blocks == 3 * 4  # four blocks per row below the window
    assert report.relative_error == pytest.approx(math.sqrt((err**2).sum() / (source**2).sum()), rel=1e-9)
    assert report.max_abs_error == pytest.approx(float(np.abs(err).max()), rel=1e-9)
    assert report.relative_error > 0  # something was re-encoded, so the figure is not trivially 0
