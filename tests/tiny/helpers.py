"""Checkpoint helpers of the tiny tier: read a directory's tensors, and dequantize one release weight
with pipeline.formats (the expected values the loaded models are compared with)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from pipeline.formats import fp8_block_dequantize, mxfp4_dequantize


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def dequantize_tensor(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Our dequantization of one release weight: FP8 block (e4m3) or MXFP4 (int8-packed E2M1)."""
    if weight.dtype == torch.float8_e4m3fn:
        return fp8_block_dequantize(weight, scale, dtype=dtype)
    if weight.dtype == torch.int8:
        return mxfp4_dequantize(weight, scale, dtype)
    raise TypeError(f"not a release-quantized weight: {weight.dtype}")
