"""The names `dsv4 convert` shares with its command line and its report, torch-free so that `dsv4 convert
--help` can read them without loading a step."""

from __future__ import annotations

import re

STEP = "dsv4 convert"
EXPERT_SOURCES = ("export", "transcode")  # where the routed experts' NVFP4 weights come from (--experts)
# with --amax (no export): the release's MXFP4 requantized with the calibrated weight amax, or transcoded
AMAX_EXPERT_SOURCES = ("requantize", "transcode")
AMAX_RECIPES = ("experts", "full")  # --recipe: what the amax file's calibration quantized
REPORT_NAME = "dsv4-convert-report.json"
# an expert projection's NVFP4 tensor, by its name in the release layout
_EXPERT_SIBLING = re.compile(
    r"^(?P<module>.+\.ffn\.experts\.\d+\.w[123])\.(?P<part>weight|weight_scale|weight_scale_2|input_scale)$"
)

__all__ = ["AMAX_EXPERT_SOURCES", "AMAX_RECIPES", "EXPERT_SOURCES", "REPORT_NAME", "STEP"]
