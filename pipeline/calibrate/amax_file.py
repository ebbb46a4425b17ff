"""The AMAX file `dsv4 calibrate` writes: one safetensors file with exactly the keys and values of the
calibration snapshot `dsv4 quantize` keeps (``<export>.calibration/amax.safetensors``: every quantizer
ModelOpt calibrated, named as in the whole model, a 0-d float32 amax each), so a reader of one reads
the other.

What made it goes in the header's metadata as one JSON document under one key, :data:`METADATA_KEY`.
One key, because safetensors keeps the metadata in a hash map whose order changes from process to
process: with several keys, a resumed run and an uninterrupted one would differ in header bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.amax.read import CALIBRATE_METADATA_KEY
from pipeline.checkpoint import write_bytes_atomic
from pipeline.errors import DsV4Error

WRITER = "dsv4 calibrate"
METADATA_KEY = CALIBRATE_METADATA_KEY  # the key pipeline.amax reads the versions from


def encode_metadata(metadata: dict) -> dict[str, str]:
    """The safetensors metadata for ``metadata``: one key, the JSON with sorted keys (same bytes each time)."""
    return {METADATA_KEY: json.dumps({"writer": WRITER} | metadata, sort_keys=True)}


def write_amax(path: Path, amax: dict[str, torch.Tensor], metadata: dict) -> None:
    """Write AMAX under a temporary name and rename it into place: the same amax and metadata always
    give the same bytes."""
    from safetensors.torch import save

    bad = [k for k, v in amax.items() if v.dtype != torch.float32 or v.dim() != 0]
    if bad:
        raise DsV4Error(
            f"{path}: key {bad[0]}: amax must be a 0-d float32 tensor, got {amax[bad[0]].dtype} "
            f"{tuple(amax[bad[0]].shape)}"
        )
    tensors = {k: amax[k].contiguous() for k in sorted(amax)}
    write_bytes_atomic(path, save(tensors, metadata=encode_metadata(metadata)))


def read_metadata(path: Path) -> dict | None:
    """The metadata of an AMAX file, or None when ``path`` is not one `dsv4 calibrate` wrote."""
    from safetensors import safe_open

    try:
        with safe_open(path, "pt") as f:
            meta = json.loads((f.metadata() or {})[METADATA_KEY])
    except Exception:  # not safetensors, no metadata of ours, not JSON: either way not our file
        return None
    return meta if isinstance(meta, dict) and meta.get("writer") == WRITER else None
