"""Score a ModelOpt NVFP4 export on a CPU: its weights dequantized to float32 and loaded into
transformers' model, so its logits can be compared with the BF16 model's (harness/reference.py).

Weights only: every NVFP4 weight is dequantized exactly (pipeline.formats.nvfp4_dequantize) and the
forward runs with unquantized activations. A forward with NVFP4 activations needs ModelOpt's CUDA
kernels (BRIEF §5); the GPU tier measures that one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeline.checkpoint import Checkpoint
from pipeline.formats import nvfp4_dequantize

NVFP4_SIBLINGS = (".weight_scale", ".weight_scale_2", ".input_scale")


def dequantized_export(export_dir: Path, out_dir: Path, config_from: Path) -> Path:
    """Write the export with every NVFP4 weight as float32 and its scales dropped, under the export's
    own key names (transformers reads its own export dialect back), with ``config_from``'s config.json
    (the BF16 model's: the export's config carries ModelOpt's quantization_config)."""
    ck = Checkpoint.open(export_dir)
    tensors = dict(ck.iter_tensors())
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if key.endswith(NVFP4_SIBLINGS):
            continue
        if t.dtype == torch.uint8 and key.endswith(".weight"):
            base = key.removesuffix(".weight")
            out[key] = nvfp4_dequantize(
                t, tensors[base + ".weight_scale"], tensors[base + ".weight_scale_2"], torch.float32
            )
        else:
            out[key] = t
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(out, out_dir / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((Path(config_from) / "config.json").read_text())
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir
