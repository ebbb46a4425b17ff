"""The resolved amax table: one weight amax and one input amax per release module, whatever file they
came from, after the rules a converter must apply to reproduce what an export would hold.

The rules are data (:data:`SHARE_RULES`, :data:`FALLBACK`), each with its reason:

* w1 and w3 of one expert share max(w1, w3), for the weight and the input amax: vLLM fuses them into one
  w13 and keeps w1's weight_scale_2 for both (and the max of their input scales); ModelOpt's fused
  gate_up quantizer already has one amax for both, NVIDIA's quantize_to_nvfp4.py takes the max.
* The quantized linears that read the same input share the max of their amax (the full recipe): ModelOpt's
  export groups them with a probe forward and unifies their amax before writing weight_scale_2; the
  calibration snapshot keeps each member's own. The groups (attention input, query latent, shared
  experts' gate/up) are data here; the quant tier checks them against ModelOpt's own probe.
* A routed expert with no usable input amax (the MTP block's experts: transformers has no MTP module, so
  no calibration reaches them; in NVIDIA's per-expert dumps, an expert that received no token) gets the
  largest calibrated input amax of its projection among the decoder layers' experts: NVIDIA's fallback,
  which ``dsv4 quantize`` and ``dsv4 convert`` apply to exports too.
* A weight amax that is not finite and positive is refused: ModelOpt 0.47 divides by it and writes NaN
  block scales. An input amax that is not finite and positive is refused in our format (``dsv4
  quantize`` refuses such a fused-experts input quantizer before export; a per-layer value has no peer to
  borrow from) and, in NVIDIA's per-expert dumps, treated as uncalibrated (the fallback above).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import DsV4Error, one_line
from pipeline.release_layout import ROUTED_EXPERT

from .names import INPUT, MODELOPT_SPELLINGS, NVIDIA_SPELLINGS, WEIGHT, QuantizerNameError, resolve_name
from .read import DSV4, AmaxFile, is_usable


@dataclass(frozen=True)
class Value:
    amax: float  # float32, held exactly
    where: str  # the file and key it came from, and any rule that changed it


@dataclass
class ModuleAmax:
    weight: Value | None = None
    input: Value | None = None


@dataclass(frozen=True)
class ShareRule:
    """The modules ``<parent>.<member>`` of one parent (``parent`` fullmatched) share the max of their
    ``kinds`` of amax."""

    name: str
    parent: str
    members: tuple[str, ...]
    kinds: tuple[str, ...]
    reason: str


_SHARED_INPUT = (
    "ModelOpt 0.47's export (requantize_resmooth_fused_llm_layers) runs a probe forward, groups the "
    "quantized linears that read the same input tensor and gives each group the max of its weight (and "
    "input) amax, so that they could be fused; the calibration snapshot keeps each member's own amax. "
    "In transformers 5.23's DeepSeek V4 these groups are, per layer: "
)
SHARE_RULES: tuple[ShareRule, ...] = (
    ShareRule(
        "routed-w13",
        r"(?:layers|mtp)\.\d+\.ffn\.experts\.\d+",
        ("w1", "w3"),
        (WEIGHT, INPUT),
        "vLLM fuses w1 and w3 into one w13 and keeps w1's weight_scale_2 for both (the max of the input "
        "scales); ModelOpt's fused gate_up_proj quantizer has one amax for both; NVIDIA's "
        "quantize_to_nvfp4.py sets both to max(w1, w3)",
    ),
    ShareRule(
        "attention-input",
        r"layers\.\d+",
        (
            "attn.wq_a",
            "attn.wkv",
            "attn.compressor.wkv",
            "attn.compressor.wgate",
            "attn.indexer.compressor.wkv",
            "attn.indexer.compressor.wgate",
            "attn.indexer.weights_proj",
        ),
        (WEIGHT, INPUT),
        _SHARED_INPUT + "every projection of the normalized hidden state entering attention",
    ),
    ShareRule(
        "query-latent",
        r"layers\.\d+",
        ("attn.wq_b", "attn.indexer.wq_b"),
        (WEIGHT, INPUT),
        _SHARED_INPUT + "the attention's and the indexer's up-projections of the normalized query latent",
    ),
    ShareRule(
        "shared-experts-gate-up",
        r"layers\.\d+\.ffn\.shared_experts",
        ("w1", "w3"),
        (WEIGHT, INPUT),
        _SHARED_INPUT + "the shared expert's gate and up projections (ModelOpt's calibration also ties "
        "them to one global amax: utils/shared_input.py SHARED_PATTERNS)",
    ),
)
FALLBACK = (
    "no usable input amax: the largest calibrated input amax of the same projection among the decoder "
    "layers' routed experts (NVIDIA's fallback; the MTP block is never calibrated)"
)


@dataclass
class AmaxTable:
    """Release module -> its weight and input amax, resolved."""

    source: AmaxFile
    modules: dict[str, ModuleAmax] = field(default_factory=dict)
    uncalibrated_inputs: list[str] = field(default_factory=list)  # NVIDIA entries of 0/NaN, dropped

    def weight(self, module: str) -> Value | None:
        m = self.modules.get(module)
        return m.weight if m else None

    def input(self, module: str) -> Value | None:
        m = self.modules.get(module)
        return m.input if m else None

    def with_weight(self) -> set[str]:
        return {name for name, m in self.modules.items() if m.weight is not None}

    def fallback_input(self, proj: str) -> Value | None:
        """The largest calibrated input amax of routed-expert projection ``proj`` (w1/w2/w3) in the
        decoder layers (not the MTP block), or None if none has one."""
        best: tuple[float, str] | None = None
        for name in sorted(self.modules):
            me = ROUTED_EXPERT.match(name)
            v = self.modules[name].input
            calibrated = me and me["kind"] == "layers" and me["w"] == proj and v is not None
            if calibrated and (best is None or v.amax > best[0]):
                best = (v.amax, name)
        if best is None:
            return None
        return Value(best[0], f"fallback: largest calibrated {proj} input amax ({best[1]})")


def build_table(source: AmaxFile, n_experts: int) -> AmaxTable:
    """Resolve every entry to its release module(s) and apply :data:`SHARE_RULES`; DsV4Error naming every
    bad entry (file and key) otherwise. ``n_experts``: the release's routed experts per layer."""
    spellings = MODELOPT_SPELLINGS if source.format == DSV4 else NVIDIA_SPELLINGS
    table = AmaxTable(source)
    set_by: dict[tuple[str, str], str] = {}
    problems: list[str] = []
    for e in source.entries:
        try:
            r = resolve_name(e.key, n_experts, spellings)
        except QuantizerNameError as err:
            problems.append(f"{e.file}: key {e.key}: {err}")
            continue
        if not is_usable(e.value):
            if r.kind == INPUT and source.format != DSV4:
                table.uncalibrated_inputs.append(e.where)
                continue
            problems.append(
                f"{e.where}: {r.kind} amax {e.value!r} is not finite and positive ("
                + (
                    "ModelOpt 0.47 would write NaN block scales from it)"
                    if r.kind == WEIGHT
                    else "the quantizer saw no calibration data; dsv4 quantize refuses it before export: "
                    "calibrate with more or more varied samples)"
                )
            )
            continue
        for module in r.modules:
            slot = (module, r.kind)
            if slot in set_by:
                problems.append(
                    f"{e.where}: sets the {r.kind} amax of {module}, which {set_by[slot]} set already"
                )
                continue
            set_by[slot] = e.where
            setattr(table.modules.setdefault(module, ModuleAmax()), r.kind, Value(e.value, e.where))
    if problems:
        raise DsV4Error(f"{source.path}: {one_line(problems, show=3)}")
    _share(table)
    return table


def share_groups(modules) -> dict[tuple[str, str], list[str]]:
    """(rule name, parent) -> the release modules among ``modules`` that share amax by that rule."""
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for name in sorted(modules):
        for rule in SHARE_RULES:
            for member in rule.members:
                parent = name[: -len(member) - 1]
                if name.endswith("." + member) and re.fullmatch(rule.parent, parent):
                    groups[(rule.name, parent)].append(name)
    return dict(groups)


def _share(table: AmaxTable) -> None:
    rules = {r.name: r for r in SHARE_RULES}
    for (rule_name, parent), names in sorted(share_groups(table.modules).items()):
        members = {n: table.modules[n] for n in names}
        for kind in rules[rule_name].kinds:
            values = [v for v in (getattr(m, kind) for m in members.values()) if v is not None]
            if not values or all(v.amax == values[0].amax for v in values):
                continue  # nothing to share (ModelOpt's fused gate_up has one amax already)
            top = max(values, key=lambda v: v.amax)
            shared = Value(top.amax, f"{top.where} (the max of its group {parent}: rule {rule_name})")
            for m in members.values():
                if getattr(m, kind) is not None:
                    setattr(m, kind, shared)


def load_table(path: str | Path, n_experts: int) -> AmaxTable:
    from .read import read_amax

    return build_table(read_amax(path), n_experts)


__all__ = [
    "FALLBACK",
    "SHARE_RULES",
    "AmaxTable",
    "ModuleAmax",
    "ShareRule",
    "Value",
    "build_table",
    "load_table",
]
