"""Quantizer names -> release modules: the one table from the names an amax file is keyed by to the
release module (dialect N, ``layers.3.attn.wq_a``) whose tensors a converter writes.

Two spellings reach ``dsv4 convert --amax``:

* **ModelOpt 0.47 on transformers 5.23** (``dsv4 quantize``'s snapshot, ``dsv4 calibrate``): a quantizer
  is named after the module it sits on, in transformers' module names (dialect H), with ``.weight_quantizer``
  or ``.input_quantizer`` after it. transformers fuses the routed experts into 3-D parameters, and ModelOpt
  gives each fused parameter one weight quantizer per expert (``<param>_weight_quantizers.<E>``) and one
  input quantizer for all experts of the layer (``<param>_input_quantizer``).
* **NVIDIA's ptq.py** (Model-Optimizer ``examples/deepseek/deepseek_v4``): DeepSeek's inference module
  names, which are the release's own, per expert: ``layers.L.ffn.experts.E.w1_weight_quantizer._amax``.

The module-name half of the first spelling is not restated here: it goes through
:func:`pipeline.mapping.rename` with dialect H, the table every other H key goes through. What this
module adds is the quantizer suffixes and the fused-experts spelling, both as data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipeline.mapping import UnmappedKeyError, rename
from pipeline.release_layout import ROUTED_EXPERT

WEIGHT, INPUT = "weight", "input"  # which amax: of the weight, or of the activation entering the layer

# transformers 5.23 fuses a layer's routed experts into 3-D parameters (gate first in gate_up_proj); each
# fused parameter stands for these per-expert projections, named as dialect H names them when split
# (the seeds' ModelOpt 0.45 export: mlp.experts.E.gate_proj), which pipeline.mapping renames to w1/w3/w2.
FUSED_EXPERT_PARAMS: dict[str, tuple[str, ...]] = {
    "gate_up_proj": ("gate_proj", "up_proj"),
    "down_proj": ("down_proj",),
}


@dataclass(frozen=True)
class QuantizerSpelling:
    """One way a quantizer's name is built; ``pattern`` is fullmatched, its groups name the module."""

    name: str
    pattern: str
    kind: str  # WEIGHT or INPUT
    per_layer: bool  # one amax for every routed expert of the layer (the fused input quantizers)
    reason: str


_FUSED = "|".join(FUSED_EXPERT_PARAMS)
SPELLINGS: tuple[QuantizerSpelling, ...] = (
    QuantizerSpelling(
        "modelopt.fused-experts.weight",
        rf"(?P<parent>model\.layers\.\d+\.mlp\.experts)\.(?P<param>{_FUSED})_weight_quantizers\.(?P<e>\d+)",
        WEIGHT,
        False,
        "ModelOpt 0.47's _QuantFusedExperts: one weight quantizer per expert slice of the fused parameter",
    ),
    QuantizerSpelling(
        "modelopt.fused-experts.input",
        rf"(?P<parent>model\.layers\.\d+\.mlp\.experts)\.(?P<param>{_FUSED})_input_quantizer",
        INPUT,
        True,
        "ModelOpt 0.47's _QuantFusedExperts: one input quantizer per fused parameter, shared by every "
        "expert of the layer (so every expert gets the same activation scale)",
    ),
    QuantizerSpelling(
        "modelopt.linear",
        r"(?P<module>model\..+)\.(?P<kind>weight|input)_quantizer",
        "",  # from the name
        False,
        "ModelOpt's QuantLinear: <module>.weight_quantizer and <module>.input_quantizer",
    ),
    QuantizerSpelling(
        "nvidia.ptq",
        r"(?P<module>(?:layers|mtp)\.\d+\.ffn\.experts\.\d+\.w[123])_(?P<kind>weight|input)_quantizer\._amax",
        "",
        False,
        "NVIDIA's ptq.py QuantExpert: w{1,2,3}_{weight,input}_quantizer per expert, under the release's "
        "own module names (its quantize_to_nvfp4.py accepts exactly these keys)",
    ),
)
MODELOPT_SPELLINGS = tuple(s for s in SPELLINGS if s.name.startswith("modelopt."))
NVIDIA_SPELLINGS = tuple(s for s in SPELLINGS if s.name.startswith("nvidia."))


class QuantizerNameError(ValueError):
    """A key no spelling maps to a release module (the message says what was expected)."""


@dataclass(frozen=True)
class Resolved:
    """What one amax file key stands for."""

    kind: str  # WEIGHT or INPUT
    modules: tuple[str, ...]  # the release modules it applies to
    spelling: str


def _native_module(h_module: str) -> str:
    """The release module of a transformers (dialect H) module name, by pipeline.mapping's rules."""
    try:
        _, target = rename(h_module + ".weight", "H")
    except UnmappedKeyError as err:
        raise QuantizerNameError(f"module {h_module}: {err}") from None
    return target.removesuffix(".weight")


def resolve_name(key: str, n_experts: int, spellings: tuple[QuantizerSpelling, ...] = SPELLINGS) -> Resolved:
    """The release module(s) a quantizer key stands for; QuantizerNameError if no spelling maps it.
    ``n_experts``: routed experts per layer (a fused input quantizer stands for all of them)."""
    for s in spellings:
        m = re.fullmatch(s.pattern, key)
        if m is None:
            continue
        g = m.groupdict()
        kind = s.kind or g["kind"]
        if s.name == "nvidia.ptq":
            if not ROUTED_EXPERT.match(g["module"]):  # pragma: no cover - the pattern is narrower
                raise QuantizerNameError(f"{key}: {g['module']} is not a routed expert")
            return Resolved(kind, (g["module"],), s.name)
        if "param" in g:
            experts = range(n_experts) if s.per_layer else (int(g["e"]),)
            modules = tuple(
                _native_module(f"{g['parent']}.{e}.{split}")
                for split in FUSED_EXPERT_PARAMS[g["param"]]
                for e in experts
            )
            return Resolved(kind, modules, s.name)
        return Resolved(kind, (_native_module(g["module"]),), s.name)
    shown = "; ".join(f"{s.name}: {s.pattern}" for s in spellings)
    raise QuantizerNameError(f"{key}: not a quantizer name this converter knows (expected one of: {shown})")


__all__ = [
    "FUSED_EXPERT_PARAMS",
    "INPUT",
    "MODELOPT_SPELLINGS",
    "NVIDIA_SPELLINGS",
    "SPELLINGS",
    "WEIGHT",
    "QuantizerNameError",
    "QuantizerSpelling",
    "Resolved",
    "resolve_name",
]
