"""A ModelOpt NVFP4 export (dialect H, X or N) -> the layout vLLM's DeepSeek V4 loads.

The output is :func:`pipeline.mapping.target_layout`: the release layout (native names, FP8 block
attention with UE8M0 ``.scale``, BF16/F32 plain tensors) with every routed expert as ModelOpt NVFP4
(``.weight``, ``.weight_scale``, ``.weight_scale_2``, ``.input_scale``), plus config.json and
hf_quant_config.json from ``pipeline.config.fix_config``. Names and actions come from the one table in
``pipeline.mapping``; this module only decides where each output tensor's bytes come from and runs the
action:

* from the export, by its mapping (copy, cast, keep NVFP4, NVFP4 -> FP8 block, NVFP4 -> BF16,
  BF16 -> FP8 block, drop);
* with ``graft_from`` (a release checkpoint): every tensor that is not a routed expert, byte for byte
  from the release (NVIDIA's experts-only recipe keeps attention exactly as released), and the routed
  experts the export lacks (the MTP block's: transformers has no MTP module) transcoded from the
  release's MXFP4, with an activation scale from the export's calibrated experts;
* without it, the MTP block is left out and config.json says ``num_nextn_predict_layers: 0`` (serve
  without MTP speculative decoding).

vLLM fuses each expert's w1 and w3 into one w13 and keeps w1's ``weight_scale_2`` for both; where an
export gives them different global scales (ModelOpt 0.45 did, per expert), both get the larger one and
the block scales of the other are re-expressed against it (``nvfp4_rescale``; codes unchanged). The
error that adds is measured exactly and reported.

The same machinery as ``dsv4 dequant``: inputs validated first (headers, layout, every key mapped,
shapes), the output planned from headers, written shard by shard through the crash-safe writer
(``--resume`` gives byte-identical output), conversions on the GPU when there is one.
"""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
import threading
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline import mapping as M
from pipeline.checkpoint import (
    CONFIG_NAME,
    INDEX_NAME,
    JOURNAL_NAME,
    Checkpoint,
    Layout,
    ShardPlan,
    TensorInfo,
    ensure_valid,
    plan_shards,
    producer_pool,
    read_tensor,
)
from pipeline.checkpoint.reader import read_json_object
from pipeline.checkpoint.validate import check_read_values
from pipeline.checkpoint.writer import PlannedTensor
from pipeline.config import DEFAULT_TARGET, HF_QUANT_CONFIG, fix_config, layout_config
from pipeline.config import dumps as config_dumps
from pipeline.device import resolve_device
from pipeline.errors import DsV4Error, one_line
from pipeline.formats import (
    NVFP4_BLOCK,
    fp8_block_quantize,
    mxfp4_to_nvfp4,
    nvfp4_dequantize,
    nvfp4_global_scale,
    nvfp4_quantize,
    nvfp4_rescale,
    transcode_exponent,
)
from pipeline.formats.e2m1 import decode_packed
from pipeline.formats.fp8_block import STRIP_ELEMENTS
from pipeline.provenance import code_digest
from pipeline.release_layout import ROUTED_EXPERT, scale_key
from pipeline.step_options import DEFAULT_SHARD_BYTES
from pipeline.streaming_step import Step, StepResult, run_step

STEP = "dsv4 convert"
EXPERT_SOURCES = ("export", "transcode")
REPORT_NAME = "dsv4-convert-report.json"
_EXPERT_SIBLING = re.compile(
    r"^(?P<module>.+\.ffn\.experts\.\d+\.w[123])\.(?P<part>weight|weight_scale|weight_scale_2|input_scale)$"
)
# files of an export that the output does not copy: its own tensors, index and configs are rewritten
_NOT_COPIED = (INDEX_NAME, CONFIG_NAME, HF_QUANT_CONFIG, JOURNAL_NAME, REPORT_NAME)


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
class UnifyStats:
    """What giving w1 and w3 one global scale cost, measured on the experts converted in this run."""

    experts: int = 0  # experts whose w1/w3 global scales were compared
    changed: int = 0  # of those, the ones whose scales differed
    max_ratio: float = 1.0  # largest larger/smaller global-scale ratio
    max_rel_error: float = 0.0  # largest ||W' - W|| / ||W|| of a rescaled tensor
    err_sq: float = 0.0
    ref_sq: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, ratio: float, err_sq: float, ref_sq: float) -> None:
        with self._lock:
            self.experts += 1
            if ratio != 1.0:
                self.changed += 1
                self.max_ratio = max(self.max_ratio, ratio)
                self.err_sq += err_sq
                self.ref_sq += ref_sq
                if ref_sq:
                    self.max_rel_error = max(self.max_rel_error, math.sqrt(err_sq / ref_sq))

    @property
    def rel_error(self) -> float:
        """||error|| / ||weight|| over every rescaled tensor together."""
        return math.sqrt(self.err_sq / self.ref_sq) if self.ref_sq else 0.0


@dataclass
class TranscodeStats:
    """How exactly the release's MXFP4 experts became NVFP4 (pipeline.formats.mxfp4_to_nvfp4)."""

    tensors: int = 0
    exact: int = 0  # tensors whose every block kept its value
    requantized_blocks: int = 0  # blocks below the e4m3 window, re-encoded at the smallest scale
    blocks: int = 0
    max_rel_error: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, report) -> None:
        with self._lock:
            self.tensors += 1
            self.exact += int(report.exact)
            self.requantized_blocks += report.requantized_blocks
            self.blocks += report.blocks
            self.max_rel_error = max(self.max_rel_error, report.relative_error)


@dataclass
class RunStats:
    """What the jobs of one run measured (threads add to it)."""

    unify: UnifyStats = field(default_factory=UnifyStats)
    transcode: TranscodeStats = field(default_factory=TranscodeStats)


@dataclass
class ConvertPlan:
    export: Path
    release: Path | None
    dialect: str
    mapping: M.Plan
    layout: dict[str, M.TargetTensor]  # what is written (the target layout, less an absent MTP block)
    jobs: dict[str, Job]  # by name
    job_of: dict[str, str]  # output key -> job name
    dropped: list[tuple[str, str]]  # (export key, why it is not written)
    omitted: list[tuple[str, str]]  # (target key, why the output lacks it)
    config: dict  # the output's config.json
    hf_quant_config: dict | None
    config_changes: list
    extra_files: list[Path]
    max_shard_bytes: int = DEFAULT_SHARD_BYTES

    @property
    def read_bytes(self) -> int:
        return sum(j.read_bytes for j in self.jobs.values())

    @property
    def has_mtp(self) -> bool:
        return any(k.startswith("mtp.") for k in self.layout)

    def output(self):
        planned = [PlannedTensor(t.key, t.dtype, t.shape) for t in self.layout.values()]
        return plan_shards(planned, max_shard_bytes=self.max_shard_bytes)

    def counts(self) -> Counter[tuple[str, str, str]]:
        """(source, rule, action) -> number of output tensors."""
        out: Counter[tuple[str, str, str]] = Counter()
        for key in self.layout:
            job = self.jobs[self.job_of[key]]
            source = "release" if job.action in (M.GRAFT, M.TRANSCODE) else "export"
            out[(source, job.rule, job.action)] += 1
        return out

    def report(self) -> dict:
        """The deterministic part of the record written beside the output (no timings, no paths)."""
        dropped_by: Counter[str] = Counter(why for _, why in self.dropped)
        return {
            "step": STEP,
            "code": code_digest(),
            "dialect": self.dialect,
            "grafted_from_release": self.release is not None,
            "outputs_by_source_rule_action": [
                {"source": s, "rule": r, "action": a, "tensors": n}
                for (s, r, a), n in sorted(self.counts().items())
            ],
            "dropped_export_keys": [{"reason": why, "keys": n} for why, n in sorted(dropped_by.items())],
            "omitted_target_keys": [
                {"reason": why, "keys": n, "example": next(k for k, w in self.omitted if w == why)}
                for why, n in sorted(Counter(why for _, why in self.omitted).items())
            ],
            "num_nextn_predict_layers": self.config.get("num_nextn_predict_layers"),
            "config_changes": [_compact_change(c.to_json()) for c in self.config_changes],
        }


def _compact_change(change: dict, limit: int = 400) -> dict:
    """A config change for the report: values longer than ``limit`` characters of JSON (V4 Pro's
    quantized_layers map lists 71k experts) are summarised by their size; config.json has them whole."""
    out = dict(change)
    for side in ("before", "after"):
        text = json.dumps(out.get(side), sort_keys=True)
        if len(text) > limit:
            out[side] = f"<{len(text)} characters of JSON; see the file>"
    return out


# ---- planning ----------------------------------------------------------------------------------


def _triples(ck: Checkpoint) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(k, i.dtype, tuple(i.shape)) for k, i in ck.tensors.items()]


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


def plan_convert(
    export_dir: str | Path,
    *,
    graft_from: str | Path | None = None,
    dialect: str | None = None,
    target_vllm: str = DEFAULT_TARGET,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    full_scales: bool = False,
    scale_sample: int | None = None,
    experts: str = "export",
) -> ConvertPlan:
    """Validate the export (and the release to graft from), map every key, and plan every output tensor
    from headers alone. Raises DsV4Error naming every problem before anything is written.
    ``scale_sample``: how many scale tensors validation reads (default: the validator's sample; 0 for
    headers only, as the full-scale tests on sparse replicas need). ``experts``: "export" (the routed
    experts' NVFP4 weights as quantized) or "transcode" (from the release's MXFP4, bit-exact where the
    exponents fit; the export supplies only the activation scales; needs ``graft_from``)."""
    if experts not in EXPERT_SOURCES:
        raise DsV4Error(f"{STEP}: --experts must be one of {', '.join(EXPERT_SOURCES)}; got {experts!r}")
    if experts == "transcode" and graft_from is None:
        raise DsV4Error(
            f"{STEP}: --experts transcode takes the expert weights from the release: pass --graft-from"
        )
    check = {"full_scales": full_scales} | ({} if scale_sample is None else {"sample_size": scale_sample})
    export = ensure_valid(export_dir, expect=Layout.NVFP4, step=STEP, **check)
    if export.config is None:
        raise DsV4Error(f"{export.root}: no config.json; {STEP} needs the export's config")
    release = None
    release_config = None
    if graft_from is not None:
        release = ensure_valid(graft_from, expect=Layout.RELEASE, step=f"{STEP} --graft-from", **check)
        release_config = release.config
        if release_config is None:
            raise DsV4Error(f"{release.root}: no config.json in the release to graft from")
    layout_cfg = layout_config(
        export.config,
        release_config,
        where=str(export.root / CONFIG_NAME),
        source_where=str(release.root / CONFIG_NAME) if release is not None else "source config",
    )
    mplan = M.plan(_triples(export), layout_cfg, dialect)
    target = mplan.layout

    jobs: dict[str, Job] = {}
    job_of: dict[str, str] = {}

    def add(job: Job) -> None:
        jobs[job.name] = job
        for k in job.outputs:
            job_of[k] = job.name

    # 1. the export's tensors, by their mapping
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
            float_experts[_w13_group(module)].append(m)
            continue
        inputs = [info]
        params: tuple = ()
        if m.action in (M.NVFP4_TO_FP8, M.NVFP4_TO_BF16):
            base = m.source.removesuffix(".weight")
            inputs += [export.tensors[base + ".weight_scale"], export.tensors[base + ".weight_scale_2"]]
        if m.action == M.CAST:
            params = (target[m.target].dtype,)
        add(Job(m.source, m.action, m.rule, m.writes, tuple(inputs), params))
    for expert, parts in sorted(unify.items()):
        need = [f"{w}.{p}" for w in ("w1", "w3") for p in ("weight_scale", "weight_scale_2")]
        lacking = [n for n in need if n not in parts]
        if lacking:  # pragma: no cover - mapping.plan checks every target key is written
            raise DsV4Error(f"{export.root}: {expert}: no {', '.join(lacking)} in the export")
        ordered = [parts[n] for n in need]
        weights = []
        for w in ("w1", "w3"):
            src = by_source_weight(by_source, parts[f"{w}.weight_scale"].source)
            weights.append(export.tensors[src])
        add(
            Job(
                f"unify:{expert}",
                M.UNIFY_W13,
                ordered[0].rule,
                tuple(m.target for m in ordered),
                tuple(export.tensors[m.source] for m in ordered),
                tuple(weights),
            )
        )

    for group, ms in sorted(float_experts.items()):
        ms = sorted(ms, key=lambda m: m.target)
        add(
            Job(
                f"quantize:{group}",
                M.BF16_TO_NVFP4,
                ms[0].rule,
                tuple(w for m in ms for w in m.writes),
                tuple(export.tensors[m.source] for m in ms),
            )
        )

    # 2. grafting: every non-expert tensor from the release, byte for byte
    if release is not None:
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
                _unassign(jobs, job_of, key)
                add(Job(f"graft:{key}", M.GRAFT, "graft", (key,), (info,)))
        if problems:
            raise DsV4Error(f"{STEP}: cannot graft from {release.root}: {one_line(problems, show=3)}")
        for key, spec in target.items():
            # every expert weight from the release with --experts transcode; and always those the export
            # only has as float (hf_ptq's MTP block): the release's MXFP4 transcodes them exactly
            from_float = key in job_of and jobs[job_of[key]].action == M.BF16_TO_NVFP4
            if (
                spec.fmt == M.NVFP4
                and not key.endswith(".input_scale")
                and (experts == "transcode" or from_float)
            ):
                _unassign(jobs, job_of, key)
        # routed experts the export lacks (the MTP block's, or all with --experts transcode): transcoded
        # from the release's MXFP4
        lacking: dict[str, list[str]] = defaultdict(list)
        for key, spec in target.items():
            if spec.fmt == M.NVFP4 and key not in job_of:
                lacking[spec.weight].append(key)
        pairs: dict[str, list[str]] = defaultdict(list)
        for module in lacking:
            pairs[_w13_group(module)].append(module)
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
            add(Job(f"transcode:{group_name}", M.TRANSCODE, "graft", tuple(outputs), tuple(inputs)))
    # activation scales no calibration produced (the MTP block's experts): NVIDIA's fallback
    uncalibrated = [
        k
        for k, spec in target.items()
        if spec.fmt == M.NVFP4
        and k.endswith(".input_scale")
        and k not in job_of
        and k.removesuffix(".input_scale") + ".weight" in job_of
    ]
    fallback = _fallback_input_scales(export, mplan) if uncalibrated else {}
    for key in uncalibrated:
        module = key.removesuffix(".input_scale")
        proj = module.rsplit(".", 1)[1]
        if proj not in fallback:
            raise DsV4Error(f"{export.root}: no calibrated {proj} input_scale in the export to give {module}")
        add(Job(f"input_scale:{module}", M.FALLBACK_INPUT_SCALE, "fallback", (key,), (), (fallback[proj],)))
    out_layout = {}
    absent = dict(mplan.absent)
    omitted: list[tuple[str, str]] = []
    for key, spec in target.items():
        if key in job_of:
            out_layout[key] = spec
            continue
        why = absent.get(key)
        if why is None:  # pragma: no cover - mapping.plan lists every other unwritten key as a problem
            raise DsV4Error(f"{key}: no source in the export")
        omitted.append((key, why))
    mtp_blocks = {k.split(".")[1] for k in target if k.startswith("mtp.")}
    if omitted and any(k.startswith("mtp.") for k in out_layout):
        shown = ", ".join(k for k, _ in omitted[:3])
        raise DsV4Error(f"{STEP}: the MTP block would be written incomplete (no source for {shown})")

    # 3. config.json and hf_quant_config.json, by fix-config's table
    cfg = copy.deepcopy(export.config)
    if mtp_blocks and not any(k.startswith("mtp.") for k in out_layout):
        # no MTP weights: the output must not announce an MTP block (vLLM would build its draft model)
        cfg["num_nextn_predict_layers"] = 0
        if isinstance(cfg.get("compress_ratios"), list):
            cfg["compress_ratios"] = cfg["compress_ratios"][: cfg["num_hidden_layers"]]
        source_cfg = None
    else:
        source_cfg = release_config
    hfq_path = export.root / HF_QUANT_CONFIG
    hfq = read_json_object(hfq_path) if hfq_path.exists() else None  # refuses a FIFO, names bad JSON
    fixed = fix_config(
        cfg,
        target=target_vllm,
        source_config=source_cfg,
        tensor_keys=list(out_layout),
        hf_quant_config=hfq,
        where=str(export.root / CONFIG_NAME),
        source_where=str(release.root / CONFIG_NAME) if release is not None else "source config",
    )
    extras = [
        p
        for p in sorted(export.root.iterdir())
        if p.is_file()
        and not p.name.startswith(".")
        and not p.name.endswith((".safetensors", ".orig", ".partial"))
        and p.name not in _NOT_COPIED
    ]
    # every export key no job reads, with why
    jobs = {n: j for n, j in jobs.items() if any(job_of.get(k) == n for k in j.outputs)}
    used = {
        (i.file, i.key)
        for j in jobs.values()
        for i in (*j.inputs, *(p for p in j.params if isinstance(p, TensorInfo)))
    }

    def why_unused(m: M.Mapping) -> str:
        if m.action == M.DROP:
            return m.reason.rsplit(" | ", 1)[-1]
        if m.target_fmt == M.NVFP4:
            return "transcoded from the release's MXFP4 instead (--experts transcode)"
        return "grafted from the release instead"

    dropped = [
        (m.source, why_unused(m))
        for m in mplan.mappings
        if (export.tensors[m.source].file, m.source) not in used
    ]
    return ConvertPlan(
        export=export.root,
        release=release.root if release is not None else None,
        dialect=mplan.dialect,
        mapping=mplan,
        layout=out_layout,
        jobs=jobs,
        job_of={k: job_of[k] for k in out_layout},
        dropped=dropped,
        omitted=omitted,
        config=fixed.config,
        hf_quant_config=fixed.hf_quant_config,
        config_changes=list(fixed.changes),
        extra_files=extras,
        max_shard_bytes=max_shard_bytes,
    )


def by_source_weight(by_source: dict[str, M.Mapping], scale_source: str) -> str:
    """The export key of the packed weight that a block scale's key belongs to."""
    key = scale_source.removesuffix(".weight_scale") + ".weight"
    if key not in by_source:  # pragma: no cover - mapping.plan checks the NVFP4 siblings
        raise DsV4Error(f"{scale_source}: no packed weight {key} beside it")
    return key


def _w13_group(module: str) -> str:
    """The fused module vLLM builds for an expert projection: w1 and w3 -> ...w13, w2 alone."""
    me = ROUTED_EXPERT.match(module)
    assert me is not None, module
    return module if me["w"] == "w2" else module[: -len(me["w"])] + "w13"


def _unassign(jobs: dict[str, Job], job_of: dict[str, str], key: str) -> None:
    """Take ``key`` away from the job that would have written it (grafting replaces it)."""
    name = job_of.pop(key, None)
    if name is not None and not any(job_of.get(k) == name for k in jobs[name].outputs):
        del jobs[name]


# ---- running one job ---------------------------------------------------------------------------


def _to(device: torch.device, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.to(device, non_blocking=True) for t in tensors]


def _run_nvfp4_to_fp8(job: Job, t: list[torch.Tensor], device: torch.device, stats: RunStats):
    codes, bs, gs = _to(device, *t)
    # strips of whole 128-row tiles (same bytes): the float32 weight never exists whole
    strip = max(1, STRIP_ELEMENTS // (codes.shape[1] * 2 * 128)) * 128
    parts = [
        fp8_block_quantize(
            nvfp4_dequantize(codes[i : i + strip], bs[i : i + strip], gs, torch.float32), scale_fmt="ue8m0"
        )
        for i in range(0, codes.shape[0], strip)
    ]
    return torch.cat([q for q, _ in parts]), torch.cat([sc for _, sc in parts])


def _run_nvfp4_to_bf16(job: Job, t: list[torch.Tensor], device: torch.device, stats: RunStats):
    codes, bs, gs = _to(device, *t)
    return (nvfp4_dequantize(codes, bs, gs, torch.bfloat16),)


def _run_bf16_to_fp8(job: Job, t: list[torch.Tensor], device: torch.device, stats: RunStats):
    (w,) = _to(device, *t)
    return fp8_block_quantize(w, scale_fmt="ue8m0")


def _run_cast(job: Job, t: list[torch.Tensor], device: torch.device, stats: RunStats):
    from pipeline.checkpoint.dtypes import to_torch

    return (t[0].to(to_torch(job.params[0])),)


def _run_unify(job: Job, t: list[torch.Tensor], device: torch.device, stats: RunStats):
    bs1, gs1, bs3, gs3 = _to(device, *t)
    common = torch.maximum(gs1.float(), gs3.float())
    out = []
    ratio = 1.0
    err_sq = ref_sq = 0.0
    for bs, gs, weight in ((bs1, gs1, job.params[0]), (bs3, gs3, job.params[1])):
        if bool(gs.float() == common):
            out += [bs, gs]
            continue
        ratio = float(common / gs.float())
        new_bs = nvfp4_rescale(bs, gs, common)
        # exact added error: each block's codes are unchanged, only its scale product moves
        codes = read_tensor(weight).to(device, non_blocking=True)
        energy = decode_packed(codes).unflatten(-1, (-1, NVFP4_BLOCK)).pow(2).sum(-1)
        before = bs.float() * gs.float()
        after = new_bs.float() * common
        err_sq += float((energy * (after - before).pow(2)).double().sum())
        ref_sq += float((energy * before.pow(2)).double().sum())
        out += [new_bs, common.reshape(()).clone()]
    stats.unify.add(ratio, err_sq, ref_sq)
    return tuple(out)


def _run_transcode(job: Job, t: list[torch.Tensor], device: torch.device, stats: RunStats):
    t = _to(device, *t)
    pairs = [(t[i], t[i + 1]) for i in range(0, len(t), 2)]
    m = transcode_exponent(*pairs)  # shared by w1 and w3: vLLM keeps w1's weight_scale_2 for w13
    out = []
    for packed, scale in pairs:
        q, ws, ws2, report = mxfp4_to_nvfp4(packed, scale, m)
        stats.transcode.add(report)
        out += [q, ws, ws2]
    return tuple(out)


def _run_bf16_to_nvfp4(job: Job, t: list[torch.Tensor], device: torch.device, stats: RunStats):
    t = _to(device, *t)
    # one global scale for the group (w1 with w3), from the larger amax: what vLLM's fused w13 keeps
    global_scale = nvfp4_global_scale(torch.stack([w.float().abs().amax() for w in t]).amax())
    out = []
    for w in t:
        packed, block, _ = nvfp4_quantize(w, weight_scale_2=global_scale)
        out += [packed, block, global_scale.clone()]
    return tuple(out)


def _run_constant(job: Job, t: list[torch.Tensor], device: torch.device, stats: RunStats):
    return (torch.tensor(job.params[0], dtype=torch.float32),)


def _run_copy(job: Job, t: list[torch.Tensor], device: torch.device, stats: RunStats):
    return (t[0],)


RUNNERS: dict[str, Callable] = {
    M.COPY: _run_copy,
    M.KEEP_NVFP4: _run_copy,
    M.GRAFT: _run_copy,
    M.CAST: _run_cast,
    M.NVFP4_TO_FP8: _run_nvfp4_to_fp8,
    M.NVFP4_TO_BF16: _run_nvfp4_to_bf16,
    M.BF16_TO_FP8: _run_bf16_to_fp8,
    M.UNIFY_W13: _run_unify,
    M.TRANSCODE: _run_transcode,
    M.FALLBACK_INPUT_SCALE: _run_constant,
    M.BF16_TO_NVFP4: _run_bf16_to_nvfp4,
}


def run_job(job: Job, device: torch.device, stats: RunStats) -> tuple[torch.Tensor, ...]:
    tensors = [read_tensor(i) for i in job.inputs]
    # every scale and FP8 weight a job reads is checked here, where it is read: validation samples the
    # scales, so a bad one it missed is named (file and key) instead of failing inside an action
    for info, t in zip(job.inputs, tensors, strict=True):
        check_read_values(info, t)
    out = run_action(job, tensors, device, stats)
    if len(out) != len(job.outputs):  # pragma: no cover - a bug in a runner
        raise AssertionError(f"{job.name}: {len(out)} tensors for {len(job.outputs)} outputs")
    return tuple(o.cpu() for o in out)


def run_action(job: Job, tensors: list[torch.Tensor], device: torch.device, stats: RunStats):
    """RUNNERS[job.action], with the ValueError a format function raises for values it cannot take (a
    NaN BF16 weight, a product that overflows) turned into a DsV4Error naming the job's first input."""
    try:
        return RUNNERS[job.action](job, tensors, device, stats)
    except ValueError as err:
        where = f"{job.inputs[0].file}: key {job.inputs[0].key}" if job.inputs else job.name
        raise DsV4Error(f"{where}: cannot {job.action}: {err}") from err


def make_producer(plan: ConvertPlan, device: torch.device, workers: int, stats: RunStats, progress):
    """Writer producer: runs each output's job (``workers`` ahead, in threads), keeping a job's other
    outputs (an FP8 weight's scale, w3's unified scales) until their turn comes."""
    done: dict[str, torch.Tensor] = {}

    def produce(shard: ShardPlan) -> Iterator[tuple[str, torch.Tensor]]:
        with producer_pool(workers, "convert") as pool:  # Ctrl-C does not wait for it
            running: dict[str, Future] = {}
            pending: deque[str] = deque()

            def start(key: str) -> None:
                name = plan.job_of[key]
                if key not in done and name not in running:
                    running[name] = pool.submit(run_job, plan.jobs[name], device, stats)

            def finish(key: str) -> tuple[str, torch.Tensor]:
                if key in done:
                    return key, done.pop(key)
                name = plan.job_of[key]
                job = plan.jobs[name]
                if name not in running:
                    start(key)
                results = running.pop(name).result()
                if progress is not None:
                    progress.advance(job.read_bytes, key)
                for k, t in zip(job.outputs, results, strict=True):
                    if k != key:
                        done[k] = t
                return key, results[job.outputs.index(key)]

            for planned in shard.tensors:
                pending.append(planned.key)
                start(planned.key)
                if len(pending) > workers:
                    yield finish(pending.popleft())
            while pending:
                yield finish(pending.popleft())

    return produce


# ---- the step ----------------------------------------------------------------------------------


def summary_details(plan: ConvertPlan, stats: RunStats) -> list[str]:
    """The lines under convert's summary: the rule table, what transcoding and w1/w3 unification cost,
    and what was not written."""
    lines = [rule_table(plan)]
    u, tc = stats.unify, stats.transcode
    if tc.tensors:
        lines.append(
            f"transcoded from the release's MXFP4: {tc.exact} of {tc.tensors} expert tensors exactly"
            + (
                f"; {tc.requantized_blocks} of {tc.blocks} blocks below the e4m3 window re-encoded "
                f"(largest relative error of a tensor {tc.max_rel_error:.3g})"
                if tc.requantized_blocks
                else ""
            )
        )
    if u.experts:
        lines.append(
            f"w1/w3 global scales: {u.changed} of {u.experts} experts differed (largest ratio "
            f"{u.max_ratio:.4g}); unifying them added a relative weight error of {u.rel_error:.3g} "
            f"overall, {u.max_rel_error:.3g} at most per tensor"
            if u.changed
            else f"w1/w3 global scales: equal in all {u.experts} experts (nothing to unify)"
        )
    for key, why in plan.omitted[:1]:
        lines.append(f"not written: {len(plan.omitted)} tensor(s) such as {key}: {why}")
    return lines


def rule_table(plan: ConvertPlan) -> str:
    rows = sorted(plan.counts().items())
    width = max((len(r) for (_, r, _), _ in rows), default=4)
    lines = [f"  {'source':<8} {'rule':<{width}}  {'action':<24} tensors"]
    lines += [f"  {s:<8} {r:<{width}}  {a:<24} {n:>7}" for (s, r, a), n in rows]
    drops = Counter(why for _, why in plan.dropped)
    lines += [f"  dropped  {n:>5} export key(s): {why}" for why, n in sorted(drops.items())]
    return "\n".join(lines)


def convert_step(
    export_dir: str | Path,
    *,
    graft_from: str | Path | None = None,
    dialect: str | None = None,
    target_vllm: str = DEFAULT_TARGET,
    device: str = "auto",
    workers: int = 2,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    full_scales: bool = False,
    experts: str = "export",
) -> Step:
    """Validate and plan (:func:`plan_convert`): the step that :func:`pipeline.streaming_step.run_step`
    runs."""
    plan = plan_convert(
        export_dir,
        experts=experts,
        graft_from=graft_from,
        dialect=dialect,
        target_vllm=target_vllm,
        max_shard_bytes=max_shard_bytes,
        full_scales=full_scales,
    )
    dev = resolve_device(device)
    stats = RunStats()
    files = {
        name: config_dumps(obj)
        for name, obj in (
            (CONFIG_NAME, plan.config),
            (HF_QUANT_CONFIG, plan.hf_quant_config),
            (REPORT_NAME, plan.report()),
        )
        if obj is not None
    }
    return Step(
        name="convert",
        plan=plan,
        inputs=[plan.export] + ([plan.release] if plan.release else []),
        output=plan.output(),
        read_bytes=plan.read_bytes,
        producer=lambda meter: make_producer(plan, dev, max(1, workers), stats, meter),
        headline=f"{len(plan.layout)} tensors from a dialect-{plan.dialect} export"
        + (" + the release" if plan.release else ""),
        counts=plan.counts(),
        stats=stats,
        files=files,
        copies=plan.extra_files,
        details=lambda: summary_details(plan, stats),
    )


def convert_checkpoint(
    export_dir: str | Path,
    dst: str | Path,
    *,
    graft_from: str | Path | None = None,
    dialect: str | None = None,
    target_vllm: str = DEFAULT_TARGET,
    resume: bool = False,
    overwrite: bool = False,
    device: str = "auto",
    workers: int = 2,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    full_scales: bool = False,
    progress: bool = True,
    experts: str = "export",
) -> StepResult:
    """Validate and plan (:func:`plan_convert`), then write the converted checkpoint to ``dst``."""
    options = dict(
        graft_from=graft_from,
        dialect=dialect,
        target_vllm=target_vllm,
        device=device,
        workers=workers,
        max_shard_bytes=max_shard_bytes,
        full_scales=full_scales,
        experts=experts,
    )
    return run_step(
        lambda: convert_step(export_dir, **options),
        dst,
        resume=resume,
        overwrite=overwrite,
        progress=progress,
    )


def dry_run_table(plan: ConvertPlan, dst: str | Path) -> str:
    out = Path(dst).resolve()
    probe = out if out.exists() else next(p for p in out.parents if p.exists())
    output = plan.output()
    lines = [
        f"convert plan: {plan.export} (dialect {plan.dialect})"
        + (f" + graft from {plan.release}" if plan.release else "")
        + f" -> {dst}",
        rule_table(plan),
        f"  read {plan.read_bytes / 1e9:.2f} GB; output {len(output.shards)} shard(s), "
        f"{output.total_bytes / 1e9:.2f} GB; {shutil.disk_usage(probe).free / 1e9:.2f} GB free at {probe}",
    ]
    if plan.omitted:
        lines.append(
            f"  not written: {len(plan.omitted)} tensor(s), e.g. {plan.omitted[0][0]}: {plan.omitted[0][1]}"
        )
    for c in plan.config_changes:
        lines.append(f"  config: {c.key}: {c.rule}")
    return "\n".join(lines)


__all__ = [
    "REPORT_NAME",
    "RUNNERS",
    "STEP",
    "ConvertPlan",
    "Job",
    "UnifyStats",
    "convert_checkpoint",
    "convert_step",
    "dry_run_table",
    "plan_convert",
    "run_action",
    "run_job",
]
