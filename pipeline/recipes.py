"""Quantization recipes: which quantizers ModelOpt enables, as ModelOpt 0.47 quant_cfg lists.

full     every nn.Linear NVFP4 W4A4 (ModelOpt's NVFP4_DEFAULT_CFG), as the seeds ran it.
experts  routed experts only, NVFP4 W4A4 (NVIDIA's V4 recipe, BRIEF §5): attention, shared experts,
         router, embeddings and head stay in their released formats.

0.47's quant_cfg is an ordered list of {"quantizer_name": pattern, "cfg": ...} or {..., "enable": False};
later entries win. The experts recipe takes the NVFP4 weight and input cfgs from NVFP4_DEFAULT_CFG
itself, so a ModelOpt change to the NVFP4 numerics reaches both recipes alike.
"""

from __future__ import annotations

import copy

RECIPES = ("full", "experts")
# Patterns naming the routed experts' quantizers. The trailing `*` matters: with fused experts
# (transformers >= 5, ModelOpt's _QuantFusedExperts) they are `gate_up_proj_weight_quantizers.<E>`.
EXPERT_WEIGHT_PATTERN = "*mlp.experts*weight_quantizer*"
EXPERT_INPUT_PATTERN = "*mlp.experts*input_quantizer*"


def _entry(quant_cfg: list[dict], name: str) -> dict:
    for item in quant_cfg:
        if item.get("quantizer_name") == name and "cfg" in item:
            return copy.deepcopy(item["cfg"])
    raise KeyError(
        f"NVFP4_DEFAULT_CFG has no {name!r} entry: the installed ModelOpt changed its recipe layout"
    )


def recipe_config(recipe: str) -> dict:
    """The mtq.quantize config of a recipe (a fresh deep copy)."""
    import modelopt.torch.quantization as mtq

    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}; got {recipe!r}")
    base = copy.deepcopy(mtq.NVFP4_DEFAULT_CFG)
    if recipe == "full":
        return base
    weight, activation = (
        _entry(base["quant_cfg"], "*weight_quantizer"),
        _entry(base["quant_cfg"], "*input_quantizer"),
    )
    base["quant_cfg"] = [
        {"quantizer_name": "*", "enable": False},
        {"quantizer_name": EXPERT_WEIGHT_PATTERN, "cfg": weight},
        {"quantizer_name": EXPERT_INPUT_PATTERN, "cfg": activation},
    ]
    return base
