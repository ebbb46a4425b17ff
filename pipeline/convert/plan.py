"""The plan of `dsv4 convert`, from headers alone: every output tensor, the job that writes it, the
config files, and every export key left out with why.

:func:`plan_convert` reads as its steps: validate the inputs, map every export key (pipeline.mapping),
build the jobs (pipeline/convert/jobs.py), settle the output layout, rewrite the config
(pipeline.vllm_config.fix_config), list the files copied and the export keys no job reads. With
``amax`` its first argument is the release instead, and the jobs come from the release's headers and the
amax table (pipeline/convert/amax_plan.py).
"""

from __future__ import annotations

import copy
from pathlib import Path

from pipeline import mapping as M
from pipeline.checkpoint import (
    CONFIG_NAME,
    Checkpoint,
    Layout,
    TensorInfo,
    ensure_valid,
)
from pipeline.checkpoint.folder import files_to_copy
from pipeline.checkpoint.reader import read_json_object
from pipeline.errors import DsV4Error
from pipeline.step_options import DEFAULT_SHARD_BYTES
from pipeline.vllm_config import DEFAULT_TARGET, HF_QUANT_CONFIG, FixResult, fix_config, layout_config

from .constants import EXPERT_SOURCES, STEP
from .jobs import Job, JobTable, add_export_jobs, add_fallback_input_scale_jobs, add_graft_jobs
from .planned import NOT_COPIED_SUFFIXES, REWRITTEN, ConvertPlan, announce_no_mtp


def plan_convert(
    export_dir: str | Path,
    *,
    graft_from: str | Path | None = None,
    dialect: str | None = None,
    target_vllm: str = DEFAULT_TARGET,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    full_scales: bool = False,
    scale_sample: int | None = None,
    experts: str | None = None,
    amax: str | Path | None = None,
    recipe: str = "experts",
) -> ConvertPlan:
    """Validate the export (and the release to graft from), map every key, and plan every output tensor
    from headers alone. Raises DsV4Error naming every problem before anything is written.
    ``scale_sample``: how many scale tensors validation reads (default: the validator's sample; 0 for
    headers only, as the full-scale tests on sparse replicas need). ``experts``: "export" (the routed
    experts' NVFP4 weights as quantized) or "transcode" (from the release's MXFP4, bit-exact where the
    exponents fit; the export supplies only the activation scales; needs ``graft_from``).

    ``amax`` (an amax file: ours or NVIDIA's): ``export_dir`` is the release, and everything comes from
    it and the amax (pipeline/convert/amax_plan.py); ``recipe`` (experts or full) and ``experts``
    (requantize, the default, or transcode) say what is quantized."""
    if amax is not None:
        from .amax_plan import plan_from_release

        if graft_from is not None:
            raise DsV4Error(
                f"{STEP}: with --amax the release is the first argument; --graft-from is not taken"
            )
        return plan_from_release(
            export_dir,
            amax,
            recipe=recipe,
            experts=experts or "requantize",
            target_vllm=target_vllm,
            max_shard_bytes=max_shard_bytes,
            full_scales=full_scales,
            scale_sample=scale_sample,
        )
    if recipe != "experts":
        raise DsV4Error(
            f"{STEP}: --recipe is read only with --amax (an export already says what it quantized)"
        )
    experts = experts or "export"
    export, release = _validated_inputs(export_dir, graft_from, experts, full_scales, scale_sample)
    release_config = release.config if release is not None else None
    release_where = str(release.root / CONFIG_NAME) if release is not None else "source config"
    layout_cfg = layout_config(
        export.config, release_config, where=str(export.root / CONFIG_NAME), source_where=release_where
    )
    mplan = M.plan(_triples(export), layout_cfg, dialect)

    table = JobTable()
    add_export_jobs(table, export, mplan)
    if release is not None:
        add_graft_jobs(table, release, mplan.layout, experts)
    add_fallback_input_scale_jobs(table, export, mplan)

    out_layout, omitted = _output_layout(mplan, table)
    fixed = _output_config(export, release, mplan, out_layout, target_vllm)
    jobs = table.writing()
    return ConvertPlan(
        export=export.root,
        release=release.root if release is not None else None,
        dialect=mplan.dialect,
        mapping=mplan,
        layout=out_layout,
        jobs=jobs,
        job_of={k: table.job_of[k] for k in out_layout},
        dropped=_dropped(export, mplan, jobs),
        omitted=omitted,
        config=fixed.config,
        hf_quant_config=fixed.hf_quant_config,
        config_changes=list(fixed.changes),
        extra_files=_copied_files(export),
        max_shard_bytes=max_shard_bytes,
    )


def _validated_inputs(
    export_dir: str | Path,
    graft_from: str | Path | None,
    experts: str,
    full_scales: bool,
    scale_sample: int | None,
) -> tuple[Checkpoint, Checkpoint | None]:
    """The export (NVFP4 layout, with a config) and the release to graft from (or None), validated."""
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
    if graft_from is not None:
        release = ensure_valid(graft_from, expect=Layout.RELEASE, step=f"{STEP} --graft-from", **check)
        if release.config is None:
            raise DsV4Error(f"{release.root}: no config.json in the release to graft from")
    return export, release


def _triples(ck: Checkpoint) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(k, i.dtype, tuple(i.shape)) for k, i in ck.tensors.items()]


def _output_layout(mplan: M.Plan, table: JobTable) -> tuple[dict[str, M.TargetTensor], list[tuple[str, str]]]:
    """What is written (every target tensor some job writes) and what is not, with why; an MTP block is
    written whole or not at all."""
    out_layout = {}
    absent = dict(mplan.absent)
    omitted: list[tuple[str, str]] = []
    for key, spec in mplan.layout.items():
        if key in table.job_of:
            out_layout[key] = spec
            continue
        why = absent.get(key)
        if why is None:  # pragma: no cover - mapping.plan lists every other unwritten key as a problem
            raise DsV4Error(f"{key}: no source in the export")
        omitted.append((key, why))
    if omitted and any(k.startswith("mtp.") for k in out_layout):
        shown = ", ".join(k for k, _ in omitted[:3])
        raise DsV4Error(f"{STEP}: the MTP block would be written incomplete (no source for {shown})")
    return out_layout, omitted


def _output_config(
    export: Checkpoint,
    release: Checkpoint | None,
    mplan: M.Plan,
    out_layout: dict[str, M.TargetTensor],
    target_vllm: str,
) -> FixResult:
    """config.json and hf_quant_config.json of the output, by fix-config's table."""
    cfg = copy.deepcopy(export.config)
    mtp_blocks = {k.split(".")[1] for k in mplan.layout if k.startswith("mtp.")}
    if mtp_blocks and not any(k.startswith("mtp.") for k in out_layout):
        announce_no_mtp(cfg)
        source_cfg = None
    else:
        source_cfg = release.config if release is not None else None
    hfq_path = export.root / HF_QUANT_CONFIG
    hfq = read_json_object(hfq_path) if hfq_path.exists() else None  # refuses a FIFO, names bad JSON
    return fix_config(
        cfg,
        target=target_vllm,
        source_config=source_cfg,
        tensor_keys=list(out_layout),
        hf_quant_config=hfq,
        where=str(export.root / CONFIG_NAME),
        source_where=str(release.root / CONFIG_NAME) if release is not None else "source config",
    )


def _copied_files(export: Checkpoint) -> list[Path]:
    """The export's other files (tokenizer, generation config, ...), copied unchanged."""
    return files_to_copy(export.root, rewritten=REWRITTEN, skip_suffixes=NOT_COPIED_SUFFIXES)


def _dropped(export: Checkpoint, mplan: M.Plan, jobs: dict[str, Job]) -> list[tuple[str, str]]:
    """Every export key no job reads, with why."""
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

    return [
        (m.source, why_unused(m))
        for m in mplan.mappings
        if (export.tensors[m.source].file, m.source) not in used
    ]


__all__ = ["ConvertPlan", "plan_convert"]
