"""The AMAX file `dsv4 calibrate` writes: one safetensors file with exactly the keys and values of the
calibration snapshot `dsv4 quantize` keeps (``<export>.calibration/amax.safetensors``: every quantizer
ModelOpt calibrated, named as in the whole model, a 0-d float32 amax each), so a reader of one reads
the other. What made it goes in the header's metadata, each value a JSON string."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.checkpoint import write_bytes_atomic
from pipeline.errors import DsV4Error

WRITER = "dsv4 calibrate"


def write_amax(path: Path, amax: dict[str, torch.Tensor], metadata: dict) -> None:
    """Write AMAX under a temporary name and rename it into place. Keys sorted and metadata encoded the
    same way each time, so the same amax and metadata always give the same bytes."""
    from safetensors.torch import save

    bad = [k for k, v in amax.items() if v.dtype != torch.float32 or v.dim() != 0]
    if bad:
        raise DsV4Error(
            f"{path}: key {bad[0]}: amax must be a 0-d float32 tensor, got {amax[bad[0]].dtype} "
            f"{tuple(amax[bad[0]].shape)}"
        )
    meta = {"writer": json.dumps(WRITER)} | {
        k: json.dumps(v, sort_keys=True) for k, v in sorted(metadata.items())
    }
    write_bytes_atomic(path, save({k: amax[k].contiguous() for k in sorted(amax)}, metadata=meta))


def read_metadata(path: Path) -> dict | None:
    """The decoded metadata of an AMAX file, or None when ``path`` is not one `dsv4 calibrate` wrote."""
    from safetensors import safe_open

    try:
        with safe_open(path, "pt") as f:
            raw = f.metadata() or {}
        meta = {k: json.loads(v) for k, v in raw.items()}
    except Exception:  # not safetensors, or metadata that is not ours: either way not our file
        return None
    return meta if meta.get("writer") == WRITER else None
