"""The model `dsv4 calibrate` runs, built the way whole-model calibration builds it, but with no weights.

`dsv4 quantize` loads the BF16 copy `dsv4 dequant` wrote with ``DeepseekV4ForCausalLM.from_pretrained(
dtype=bfloat16)``. Layer-wise calibration must give the same amax bit for bit, so the skeleton here is
the model from_pretrained would build before it reads a weight:

* the config is the release's put through :func:`pipeline.dequant.bf16_config` (the one rewrite the BF16
  copy's config.json gets) and read back by ``AutoConfig.from_pretrained``, so every default and
  derived field transformers fills in is the same;
* the modules are created under transformers' own init context (bfloat16 default dtype, meta device):
  no memory for the 61 decoder layers until each is loaded;
* each tensor later gets the dtype from_pretrained would give it (:class:`Placement`): bfloat16, except
  the ``_keep_in_fp32_modules_strict`` ones (hyper-connections, norms, sinks, ...) in float32 and
  integer buffers as they are.

Only the embedding and the rotary tables are made real here: they are all the capture of layer 0's
inputs runs (pipeline/calibrate/capture.py).
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.dequant import bf16_config
from pipeline.errors import DsV4Error

# transformers' converters for deepseek_v4 that this module knows how to apply without their
# torch.stack/torch.cat copies: (class names of the operations) -> how a source lands in the target.
_MERGE = ("MergeModulelist",)
_MERGE_CONCAT = ("MergeModulelist", "Concatenate")
_EXPERT = re.compile(r"\.experts\.(\d+)\.")


@dataclass(frozen=True)
class Placement:
    """Where one release tensor goes in the transformers model: ``target`` (a parameter or buffer name
    of the whole model), its dtype, and for a fused-experts tensor the slice it fills."""

    target: str
    dtype: torch.dtype
    expert: int | None = None  # index along dim 0 of a fused [E, ...] parameter
    part: int = 0  # position among the converter's source patterns (w1 first, w3 second)
    parts: int = 1  # how many sources are concatenated along dim 1


def skeleton_config(release_config: dict):
    """The transformers config of the BF16 copy of this release: written as `dsv4 dequant` writes it and
    read back by AutoConfig, the same call :func:`pipeline.quantize.load_bf16_model` makes."""
    from transformers import AutoConfig

    with tempfile.TemporaryDirectory(prefix="dsv4-calibrate-config-") as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(bf16_config(release_config), indent=2) + "\n")
        return AutoConfig.from_pretrained(tmp)


def build_skeleton(config):
    """DeepseekV4ForCausalLM on the meta device, created as from_pretrained(dtype=bfloat16) creates it."""
    from transformers import DeepseekV4ForCausalLM
    from transformers.utils.generic import ContextManagers

    contexts = DeepseekV4ForCausalLM.get_init_context(torch.bfloat16, False, False, None)
    with ContextManagers(contexts):
        model = DeepseekV4ForCausalLM(config)
    return model.eval()


class Placer:
    """Release key -> :class:`Placement`, by transformers' own rename table for deepseek_v4 and the
    dtype rule of its loader (core_model_loading.convert_and_load_state_dict_in_model): the keep-fp32
    plan first, else the dtype of the skeleton's tensor where it is not bfloat16, else bfloat16."""

    def __init__(self, model) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, build_glob_alternation

        self.model = model
        mapping = get_model_conversion_mapping(model)
        self.renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        self.converters = [m for m in mapping if isinstance(m, WeightConverter)]
        self.by_pattern = {p: c for c in self.converters for p in c.source_patterns}
        for conv in self.converters:
            ops = tuple(type(op).__name__ for op in conv.operations)
            if ops not in (_MERGE, _MERGE_CONCAT) or (ops == _MERGE_CONCAT and conv.operations[1].dim != 1):
                raise DsV4Error(
                    f"transformers' deepseek_v4 weight conversion {conv.source_patterns} -> "
                    f"{conv.target_patterns} uses {ops}: dsv4 calibrate knows only MergeModulelist "
                    "[+ Concatenate(dim=1)]; the installed transformers changed it, update "
                    "pipeline/calibrate/skeleton.py"
                )
        self.meta = dict(model.state_dict(keep_vars=True))  # meta tensors: names, shapes, dtypes
        plan = model._get_dtype_plan(torch.bfloat16)
        self.fp32 = build_glob_alternation(list(plan)) if plan else None
        self.plan = plan

    def place(self, key: str) -> Placement | None:
        """Where the release tensor ``key`` goes, or None when the model has no such tensor."""
        from transformers.core_model_loading import rename_source_key

        target, pattern = rename_source_key(key, self.renamings, self.converters, "model", self.meta)
        if target not in self.meta:
            return None
        ref = self.meta[target]
        dtype = torch.bfloat16
        hit = self.fp32[0].search(target) if self.fp32 else None
        if hit is not None:
            dtype = self.plan[self.fp32[1][hit.lastgroup]]
        elif ref.dtype != torch.bfloat16:
            dtype = ref.dtype
        if pattern is None:
            return Placement(target, dtype)
        conv = self.by_pattern[pattern]
        expert = _EXPERT.search(key)
        if expert is None:
            raise DsV4Error(
                f"{key}: matched transformers' expert converter {pattern} without an expert index"
            )
        return Placement(
            target, dtype, int(expert[1]), conv.source_patterns.index(pattern), len(conv.source_patterns)
        )


def init_computed_buffers(model, root: torch.nn.Module, device: torch.device) -> None:
    """Make the non-persistent buffers under ``root`` real on ``device``, computed as from_pretrained
    computes them: moved off meta empty, then filled by the model's own ``_init_weights`` (for V4: the
    rotary modules' inverse frequencies; they are not in any checkpoint)."""
    for name, module in root.named_modules():
        computed = [b for b in module._non_persistent_buffers_set if module._buffers.get(b) is not None]
        if not computed or not any(module._buffers[b].is_meta for b in computed):
            continue
        if any(True for _ in module.parameters(recurse=False)):
            raise DsV4Error(
                f"{type(module).__name__} at {name or 'the model'}: has computed buffers and weights; dsv4 "
                "calibrate only knows modules with computed buffers alone (the rotary tables)"
            )
        for b in computed:
            module._buffers[b] = torch.empty_like(module._buffers[b], device=device)
        model._init_weights(module)


def materialize_inputs(model, embed: torch.Tensor, device: torch.device) -> None:
    """Make the embedding and the rotary tables real on ``device``: all the model's forward runs before
    layer 0."""
    inner = model.model
    inner.embed_tokens.weight = torch.nn.Parameter(embed.to(device), requires_grad=embed.is_floating_point())
    init_computed_buffers(model, inner.rotary_emb, device)
