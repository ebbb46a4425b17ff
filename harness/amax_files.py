"""Amax files made up for a release, in `dsv4 calibrate`'s format (quantizer name -> float32 scalar):
what `dsv4 convert RELEASE --amax` reads, without running a calibration (unit tests, bench/stepbench.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeline.checkpoint import Checkpoint


def write_amax(release: Path, path: Path, *, skip: str | None = None, extra: dict | None = None) -> Path:
    """An experts-recipe amax file for ``release`` in our format: per expert, gate_up weight amax
    0.5 + e/8 and down 0.25; per layer, input amax 2 + layer (gate_up) and 5 + layer (down)."""
    config = Checkpoint.open(release).config
    values = {}
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}.mlp.experts."
        for e in range(config["n_routed_experts"]):
            values[f"{p}gate_up_proj_weight_quantizers.{e}"] = 0.5 + e / 8
            values[f"{p}down_proj_weight_quantizers.{e}"] = 0.25
        values[f"{p}gate_up_proj_input_quantizer"] = 2.0 + n
        values[f"{p}down_proj_input_quantizer"] = 5.0 + n
    values.pop(skip, None)
    values |= extra or {}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: torch.tensor(v, dtype=torch.float32) for k, v in values.items()}, path)
    return path
