"""The jobs of `dsv4 convert RELEASE --amax AMAX`: every output tensor from the release and the resolved
amax table (pipeline.amax), with no BF16 copy and no ModelOpt export. Each job reproduces what today's
path writes for the same tensor (``dsv4 dequant`` -> ``dsv4 quantize`` -> ``dsv4 convert``):

* experts recipe: every tensor that is not a routed expert grafted from the release (as ``--graft-from``
  does); the decoder layers' routed experts requantized (``--experts requantize``: MXFP4 -> BF16 -> NVFP4
  with the calibrated weight amax) or transcoded (``--experts transcode``); the MTP block's experts
  transcoded, as ``--graft-from`` does for the experts no export has;
* full recipe: also every module the amax file has a weight amax for (attention, shared experts,
  compressor, indexer) quantized to NVFP4 as ModelOpt's export would, then mapped as convert maps that
  export (NVFP4 -> FP8 block, NVFP4 -> BF16); wo_a, which ModelOpt leaves BF16, through BF16 to FP8
  again; no MTP block (today's full path has none: transformers has no MTP module to calibrate);
* every routed expert's input_scale from its input amax (or NVIDIA's fallback).
"""

from __future__ import annotations

import re

from pipeline import mapping as M
from pipeline.amax import AmaxTable, Value
from pipeline.amax.read import DSV4
from pipeline.checkpoint import Checkpoint
from pipeline.errors import DsV4Error, one_line
from pipeline.release_layout import FP8, PLAIN, ROUTED_EXPERT, scale_key

from .constants import AMAX_RECIPES, STEP
from .jobs import Job, JobTable, add_graft_jobs, w13_group

RECIPES = AMAX_RECIPES
NO_MTP_IN_FULL = (
    "the full recipe's calibration (transformers' model) has no MTP block, so today's full path writes "
    "none; serve without the MTP draft (config.json says num_nextn_predict_layers 0)"
)
_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)")


def _role(module: str) -> str:
    return _INDEX.sub("#", module)


def _module_of(key: str) -> str:
    return key.removesuffix(".weight") if key.endswith(".weight") else key


def amax_layout(layout: dict[str, M.TargetTensor], recipe: str) -> tuple[dict[str, M.TargetTensor], list]:
    """(what is written, what is omitted with why): the full recipe leaves the MTP block out."""
    if recipe != "full":
        return dict(layout), []
    kept = {k: s for k, s in layout.items() if not k.startswith("mtp.")}
    return kept, [(k, NO_MTP_IN_FULL) for k in layout if k.startswith("mtp.")]


def check_coverage(
    amax: AmaxTable, layout: dict[str, M.TargetTensor], recipe: str, experts: str
) -> list[str]:
    """Every amax the plan needs is there, and every amax is for a module the release has; DsV4Error
    naming the file and the first problems otherwise. Returns the modules whose amax the recipe ignores."""
    where = amax.source.path
    modules = {_module_of(k) for k, s in layout.items() if s.fmt != M.NVFP4 and k.endswith(".weight")}
    expert_modules = {s.weight for s in layout.values() if s.fmt == M.NVFP4}
    layer_experts = sorted(m for m in expert_modules if m.startswith("layers."))
    problems = []
    unknown = sorted(
        m for m in amax.modules if m not in modules | expert_modules and not m.startswith("mtp.")
    )
    problems += [f"amax for {m}, a module the release does not have (another model's amax?)" for m in unknown]
    strict = amax.source.format == DSV4  # ModelOpt records every amax; NVIDIA's dumps may lack some
    if experts == "requantize" and strict:
        problems += [f"no weight amax for {m}" for m in layer_experts if amax.weight(m) is None]
    if strict:
        problems += [f"no input amax for {m}" for m in layer_experts if amax.input(m) is None]
    ignored = sorted(m for m in amax.with_weight() if m in modules)
    if recipe == "full":
        # a role (say attn.wq_a) the calibration quantized is quantized in every layer that has it
        roles = {_role(m) for m in ignored}
        problems += [
            f"no weight amax for {m}, though other layers' {_role(m)} have one"
            for m in sorted(modules)
            if _role(m) in roles and amax.weight(m) is None
        ]
        ignored = []
    if problems:
        raise DsV4Error(f"{where}: {STEP} --amax (recipe {recipe}): {one_line(problems, show=3)}")
    return ignored


def add_amax_jobs(
    table: JobTable,
    release: Checkpoint,
    layout: dict[str, M.TargetTensor],
    amax: AmaxTable,
    recipe: str,
    experts: str,
) -> None:
    """Every job of the plan: graft and transcode first (as --graft-from --experts transcode), then the
    jobs the recipe and --experts replace them with, then the input scales."""
    add_graft_jobs(table, release, layout, "transcode")
    if experts == "requantize":
        _requantize_layer_experts(table, release, layout, amax)
    if recipe == "full":
        _quantize_non_experts(table, release, layout, amax)
    _input_scale_jobs(table, layout, amax)


def _requantize_layer_experts(
    table: JobTable, release: Checkpoint, layout: dict[str, M.TargetTensor], amax: AmaxTable
) -> None:
    groups: dict[str, list[str]] = {}
    for spec in layout.values():
        if spec.fmt == M.NVFP4 and spec.weight.startswith("layers."):
            groups.setdefault(w13_group(spec.weight), [])
            if spec.weight not in groups[w13_group(spec.weight)]:
                groups[w13_group(spec.weight)].append(spec.weight)
    for group, modules in sorted(groups.items()):
        modules = sorted(modules)
        values = [amax.weight(m) for m in modules]
        # w1 and w3 share max(w1, w3) (pipeline.amax SHARE_RULES); None: from the weights, as ModelOpt would
        known = [v.amax for v in values if v is not None]
        shared = max(known) if len(known) == len(values) else None
        inputs, outputs = [], []
        for m in modules:
            inputs += [release.tensors[m + ".weight"], release.tensors[scale_key(m + ".weight")]]
            outputs += [m + ".weight", m + ".weight_scale", m + ".weight_scale_2"]
        table.add(
            Job(f"requantize:{group}", M.REQUANTIZE_EXPERT, "amax", tuple(outputs), tuple(inputs), (shared,))
        )


def _quantize_non_experts(
    table: JobTable, release: Checkpoint, layout: dict[str, M.TargetTensor], amax: AmaxTable
) -> None:
    for key, spec in layout.items():
        if spec.fmt == M.NVFP4 or not key.endswith(".weight"):
            continue
        module = _module_of(key)
        value: Value | None = amax.weight(module)
        weight = release.tensors[key]
        if spec.fmt == FP8:
            scale = release.tensors[scale_key(key)]
            if value is None:
                # ModelOpt leaves it BF16 (wo_a): today's convert quantizes that BF16 to FP8 tiles again
                table.add(Job(f"requant:{module}", M.FP8_REQUANT, "full", (key, scale.key), (weight, scale)))
            else:
                table.add(
                    Job(
                        f"quantize:{module}",
                        M.FP8_VIA_NVFP4,
                        "full",
                        (key, scale.key),
                        (weight, scale),
                        (value.amax,),
                    )
                )
        elif spec.fmt == PLAIN and value is not None:
            table.add(Job(f"quantize:{module}", M.BF16_VIA_NVFP4, "full", (key,), (weight,), (value.amax,)))


def _input_scale_jobs(table: JobTable, layout: dict[str, M.TargetTensor], amax: AmaxTable) -> None:
    fallbacks: dict[str, Value | None] = {}
    for key, spec in layout.items():
        if spec.fmt != M.NVFP4 or not key.endswith(".input_scale"):
            continue
        module = spec.weight
        value = amax.input(module)
        rule = "amax"
        if value is None:
            proj = ROUTED_EXPERT.match(module)["w"]  # type: ignore[index]
            if proj not in fallbacks:
                fallbacks[proj] = amax.fallback_input(proj)
            value, rule = fallbacks[proj], "fallback"
            if value is None:
                raise DsV4Error(
                    f"{amax.source.path}: no calibrated {proj} input amax of any decoder layer's routed "
                    f"expert to give {module} (NVIDIA's fallback)"
                )
        table.add(Job(f"input_scale:{module}", M.INPUT_SCALE, rule, (key,), (), (value.amax,)))


__all__ = ["NO_MTP_IN_FULL", "RECIPES", "add_amax_jobs", "amax_layout", "check_coverage"]
