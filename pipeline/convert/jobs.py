"""The jobs of a conversion: which computation writes each output tensor, and what it reads.

A :class:`Job` reads some input tensors (export or release) and returns one tensor per output key; its
action is one of pipeline.mapping's action names, run by pipeline/convert/runners.py. The plan
(pipeline/convert/plan.py) builds its :class:`JobTable` in three passes, each a function here:

1. :func:`add_export_jobs`: every export tensor, by its mapping (an NVFP4 weight's job reads its scales;
   an expert's w1 and w3 block and global scales are unified by one job; float experts are quantized
   per w13/w2 group);
2. :func:`add_graft_jobs` (with ``--graft-from``): every non-expert tensor from the release, byte for byte,
   and the routed experts the export lacks (or all, with ``--experts transcode``) transcoded from its MXFP4;
3. :func:`add_fallback_input_scale_jobs`: an activation scale no calibration produced (the MTP block's
   experts) gets the largest calibrated one of its projection.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import mapping as M
from pipeline.checkpoint import Checkpoint, TensorInfo, read_tensor
from pipeline.errors import DsV4Error, one_line
from pipeline.release_layout import ROUTED_EXPERT, scale_key

from .constants import _EXPERT_SIBLING, STEP


@dataclass(frozen=True)
class Job:
    """One computation: reads ``inputs`` and returns one tensor per key of ``outputs``, in order."""

    name: str
    action: str  # a pipeline.mapping action name
    rule: str  # the rename rule (or the source choice) behind it
    outputs: tuple[str, ...]
    inputs: tuple[TensorInfo, ...]
    params: tuple = ()

    @property
    def read_bytes(self) -> int:
        return sum(i.nbytes for i in self.inputs)


@dataclass
class JobTable:
    """The jobs by name, and which job writes each output key."""

    jobs: dict[str, Job] = field(default_factory=dict)
    job_of: dict[str, str] = field(default_factory=dict)  # output key -> job name

    def add(self, job: Job) -> None:
        self.jobs[job.name] = job
        for k in job.outputs:
            self.job_of[k] = job.name

    def unassign(self, key: str) -> None:
        """Take ``key`` away from the job that would have written it (grafting replaces it)."""
        name = self.job_of.pop(key, None)
        if name is not None and not any(self.job_of.get(k) == name for k in self.jobs[name].outputs):
            del self.jobs[name]

    def writing(self) -> dict[str, Job]:
        """The jobs that still write at least one output."""
        return {n: j for n, j in self.jobs.items() if any(self.job_of.get(k) == n for k in j.outputs)}


def w13_group(module: str) -> str:
    """The fused module vLLM builds for an expert projection: w1 and w3 -> ...w13, w2 alone."""
    me = ROUTED_EXPERT.match(module)
    assert me is not None, module
    return module if me["w"] == "w2" else module[: -len(me["w"])] + "w13"


def by_source_weight(by_source: dict[str, M.Mapping], scale_source: str) -> str:
    """The export key of the packed weight that a block scale's key belongs to."""
    key = scale_source.removesuffix(".weight_scale") + ".weight"
    if key not in by_source:  # pragma: no cover - mapping.plan checks the NVFP4 siblings
        raise DsV4Error(f"{scale_source}: no packed weight {key} beside it")
    return key


# ---- 1. the export's tensors, by their mapping -----------------------------------------------------


def add_export_jobs(table: JobTable, export: Checkpoint, mplan: M.Plan) -> None:
    target = mplan.layout
    by_source = {m.source: m for m in mplan.mappings}
    unify: dict[str, dict[str, M.Mapping]] = defaultdict(dict)  # expert module -> {w1.weight_scale: m, ...}
    float_experts: dict[str, list[M.Mapping]] = defaultdict(list)  # w13/w2 group -> float expert weights
    for m in mplan.mappings:
        info = export.tensors[m.source]
        if not m.writes:
            continue  # dropped, or an operand its weight's job reads
        if m.action == M.UNIFY_W13:
            mm = _EXPERT_SIBLING.match(m.target)
            assert mm is not None, m
            unify[mm["module"].rsplit(".", 1)[0]][f"{mm['module'].rsplit('.', 1)[1]}.{mm['part']}"] = m
            continue
        if m.action == M.BF16_TO_NVFP4:  # grouped below: w1 and w3 share one global scale
            module = m.target.removesuffix(".weight")
            float_experts[w13_group(module)].append(m)
            continue
        inputs = [info]
        params: tuple = ()
        if m.action in (M.NVFP4_TO_FP8, M.NVFP4_TO_BF16):
            base = m.source.removesuffix(".weight")
            inputs += [export.tensors[base + ".weight_scale"], export.tensors[base + ".weight_scale_2"]]
        if m.action == M.CAST:
            params = (target[m.target].dtype,)
        table.add(Job(m.source, m.action, m.rule, m.writes, tuple(inputs), params))
    for expert, parts in sorted(unify.items()):
        table.add(_unify_job(export, by_source, expert, parts))
    for group, ms in sorted(float_experts.items()):
        ms = sorted(ms, key=lambda m: m.target)
        table.add(
            Job(
                f"quantize:{group}",
                M.BF16_TO_NVFP4,
                ms[0].rule,
                tuple(w for m in ms for w in m.writes),
                tuple(export.tensors[m.source] for m in ms),
            )
        )


def _unify_job(
    export: Checkpoint, by_source: dict[str, M.Mapping], expert: str, parts: dict[str, M.Mapping]
) -> Job:
    """One expert's w1 and w3 block and global scales, unified; the packed weights are its params (the
    runner reads them to measure the error it adds)."""
    need = [f"{w}.{p}" for w in ("w1", "w3") for p in ("weight_scale", "weight_scale_2")]
    lacking = [n for n in need if n not in parts]
    if lacking:  # pragma: no cover - mapping.plan checks every target key is written
        raise DsV4Error(f"{export.root}: {expert}: no {', '.join(lacking)} in the export")
    ordered = [parts[n] for n in need]
    weights = []
    for w in ("w1", "w3"):
        src = by_source_weight(by_source, parts[f"{w}.weight_scale"].source)
        weights.append(export.tensors[src])
    return Job(
        f"unify:{expert}",
        M.UNIFY_W13,
        ordered[0].rule,
        tuple(m.target for m in ordered),
        tuple(export.tensors[m.source] for m in ordered),
        tuple(weights),
    )


# ---- 2. grafting from the release ------------------------------------------------------------------


def add_graft_jobs(
    table: JobTable, release: Checkpoint, target: dict[str, M.TargetTensor], experts: str
) -> None:
    """Every non-expert tensor from the release, byte for byte; routed experts from its MXFP4 where the
    export lacks them (or all of them, with ``experts == "transcode"``)."""
    problems = []
    for key, spec in target.items():
        if spec.fmt == M.NVFP4:
            continue
        info = release.tensors.get(key)
        if info is None:
            problems.append(f"{key}: not in the release {release.root}")
        elif info.dtype != spec.dtype or tuple(info.shape) != tuple(spec.shape):
            problems.append(
                f"{key}: the release has {info.dtype} {list(info.shape)}, the export's model needs "
                f"{spec.dtype} {list(spec.shape)} (a release of another model?)"
            )
        else:
            table.unassign(key)
            table.add(Job(f"graft:{key}", M.GRAFT, "graft", (key,), (info,)))
    if problems:
        raise DsV4Error(f"{STEP}: cannot graft from {release.root}: {one_line(problems, show=3)}")
    for key, spec in target.items():
        # every expert weight from the release with --experts transcode; and always those the export
        # only has as float (hf_ptq's MTP block): the release's MXFP4 transcodes them exactly
        job_of = table.job_of
        from_float = key in job_of and table.jobs[job_of[key]].action == M.BF16_TO_NVFP4
        if (
            spec.fmt == M.NVFP4
            and not key.endswith(".input_scale")
            and (experts == "transcode" or from_float)
        ):
            table.unassign(key)
    _add_transcode_jobs(table, release, target)


def _add_transcode_jobs(table: JobTable, release: Checkpoint, target: dict[str, M.TargetTensor]) -> None:
    """Routed experts no job writes (the MTP block's, or all with --experts transcode): transcoded from
    the release's MXFP4, w1 with w3 (they share one global scale in vLLM's w13)."""
    lacking: dict[str, list[str]] = defaultdict(list)
    for key, spec in target.items():
        if spec.fmt == M.NVFP4 and key not in table.job_of:
            lacking[spec.weight].append(key)
    pairs: dict[str, list[str]] = defaultdict(list)
    for module in lacking:
        pairs[w13_group(module)].append(module)
    for group_name, modules in sorted(pairs.items()):
        modules = sorted(modules)
        inputs, outputs = [], []
        for module in modules:
            w = release.tensors.get(module + ".weight")
            s = release.tensors.get(scale_key(module + ".weight"))
            if w is None or s is None or w.dtype != "I8":
                raise DsV4Error(f"{release.root}: {module}: no MXFP4 weight and scale to transcode from")
            inputs += [w, s]
            outputs += [module + ".weight", module + ".weight_scale", module + ".weight_scale_2"]
        table.add(Job(f"transcode:{group_name}", M.TRANSCODE, "graft", tuple(outputs), tuple(inputs)))


# ---- 3. activation scales no calibration produced ---------------------------------------------------


def add_fallback_input_scale_jobs(table: JobTable, export: Checkpoint, mplan: M.Plan) -> None:
    """NVIDIA's fallback for an expert whose weight is written but whose input_scale nobody calibrated
    (the MTP block's experts): the largest calibrated input_scale of its projection in the export."""
    uncalibrated = [
        k
        for k, spec in mplan.layout.items()
        if spec.fmt == M.NVFP4
        and k.endswith(".input_scale")
        and k not in table.job_of
        and k.removesuffix(".input_scale") + ".weight" in table.job_of
    ]
    fallback = _fallback_input_scales(export, mplan) if uncalibrated else {}
    for key in uncalibrated:
        module = key.removesuffix(".input_scale")
        proj = module.rsplit(".", 1)[1]
        if proj not in fallback:
            raise DsV4Error(f"{export.root}: no calibrated {proj} input_scale in the export to give {module}")
        table.add(
            Job(f"input_scale:{module}", M.FALLBACK_INPUT_SCALE, "fallback", (key,), (), (fallback[proj],))
        )


def _read_scalars(infos: list[TensorInfo]) -> list[float]:
    """0-d tensors read with one open file per shard (tens of thousands on V4 Pro)."""
    out: dict[str, float] = {}
    by_file: dict[Path, list[TensorInfo]] = defaultdict(list)
    for i in infos:
        by_file[i.file].append(i)
    for path, group in by_file.items():
        with open(path, "rb") as f:
            for i in group:
                out[i.key] = float(read_tensor(i, f))
    return [out[i.key] for i in infos]


def _fallback_input_scales(export: Checkpoint, plan: M.Plan) -> dict[str, float]:
    """Per expert projection (w1/w2/w3): the largest calibrated input_scale in the export."""
    by_proj: dict[str, list[TensorInfo]] = defaultdict(list)
    for m in plan.mappings:
        mm = _EXPERT_SIBLING.match(m.target)
        if mm and mm["part"] == "input_scale" and ROUTED_EXPERT.match(mm["module"]):
            by_proj[mm["module"].rsplit(".", 1)[1]].append(export.tensors[m.source])
    out = {}
    for proj, infos in by_proj.items():
        values = [v for v in _read_scalars(infos) if math.isfinite(v) and v > 0]
        if values:
            out[proj] = max(values)
    return out


__all__ = [
    "Job",
    "JobTable",
    "add_export_jobs",
    "add_fallback_input_scale_jobs",
    "add_graft_jobs",
    "by_source_weight",
    "w13_group",
]
