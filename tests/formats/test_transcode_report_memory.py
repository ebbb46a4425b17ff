"""The MXFP4 -> NVFP4 transcode's report on blocks below the e4m3 window uses memory linear in the blocks.

Slow tier: the first TorchDispatchMode of a process costs ~2 s, which the -m unit loop should not pay.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.formats import mxfp4_to_nvfp4
from tests.formats.test_transcode_report import _blocks

pytestmark = pytest.mark.slow


class _LargestIntermediate(TorchDispatchMode):
    """Records the most elements any torch op's output had."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_report_memory_is_linear_in_the_blocks_below_the_window():
    """64 blocks below the window: no intermediate may hold more than a few times the tensor's values.
    The broadcast made one of n * n * 32 elements (131 k here, 60 x the tensor; terabytes for a V4 Pro
    expert)."""
    n = 64
    packed, scale = _blocks([20] + [0] * n, rows=1, seed=3)
    elements = packed.numel() * 2
    with _LargestIntermediate() as probe:
        report = mxfp4_to_nvfp4(packed, scale)[3]
    assert report.requantized_blocks == n
    assert probe.largest <= 4 * elements, f"an intermediate of {probe.largest} elements for {elements}"
