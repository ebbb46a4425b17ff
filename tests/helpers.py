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


def renamed_export(export: Path, out: Path, dialect: str) -> Path:
    """A copy of a real ModelOpt 0.47 export (dialect X) under ``dialect``'s names, bytes unchanged: the
    X key's native name (pipeline.mapping) spelled by harness.exports' independent inverse (TO)."""
    import shutil

    from safetensors.torch import save_file

    from harness.exports import TO
    from pipeline.mapping import map_key

    tensors = read_tensors(export)
    renamed = {TO[dialect](map_key(k, "X").target): t for k, t in tensors.items()}
    out.mkdir(parents=True)
    save_file(renamed, out / "model.safetensors", metadata={"format": "pt"})
    for f in export.iterdir():  # config.json and everything else but the tensors
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy(f, out / f.name)
    return out
