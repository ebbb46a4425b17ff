"""`dsv4 convert` as a streaming step: the plan (pipeline/convert/plan.py) and the producer
(pipeline/convert/produce.py) handed to pipeline.streaming_step, which writes them through the crash-safe
writer; and the lines convert adds under the one summary every step prints."""

from __future__ import annotations

from pathlib import Path

from pipeline.checkpoint import CONFIG_NAME, Converters
from pipeline.device import resolve_device
from pipeline.step_options import DEFAULT_SHARD_BYTES
from pipeline.streaming_step import Step, StepResult, run_step
from pipeline.vllm_config import DEFAULT_TARGET, HF_QUANT_CONFIG
from pipeline.vllm_config import dumps as config_dumps

from .constants import REPORT_NAME
from .plan import ConvertPlan, plan_convert
from .produce import make_producer
from .runners import RunStats
from .tables import rule_table


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


def convert_step(
    export_dir: str | Path,
    *,
    graft_from: str | Path | None = None,
    dialect: str | None = None,
    target_vllm: str = DEFAULT_TARGET,
    device: str = "auto",
    workers: int | None = None,
    gpu_workers: int | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    full_scales: bool = False,
    experts: str | None = None,
    amax: str | Path | None = None,
    recipe: str = "experts",
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
        amax=amax,
        recipe=recipe,
    )
    converters = Converters.of(resolve_device(device), workers, gpu_workers)
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
        # the amax file too: --resume must notice a changed one (journal fingerprints files and folders)
        inputs=[p for p in (plan.export, plan.release) if p is not None] + ([Path(amax)] if amax else []),
        output=plan.output(),
        read_bytes=plan.read_bytes,
        producer=lambda meter: make_producer(plan, converters, stats, meter),
        headline=(
            f"{len(plan.layout)} tensors from the release + a {plan.amax['format']} amax file"
            if plan.amax
            else f"{len(plan.layout)} tensors from a dialect-{plan.dialect} export"
            + (" + the release" if plan.release else "")
        ),
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
    workers: int | None = None,
    gpu_workers: int | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    full_scales: bool = False,
    progress: bool = True,
    experts: str | None = None,
    amax: str | Path | None = None,
    recipe: str = "experts",
) -> StepResult:
    """Validate and plan (:func:`plan_convert`), then write the converted checkpoint to ``dst``. With
    ``amax``, ``export_dir`` is the release (``dsv4 convert RELEASE DST --amax AMAX``)."""
    options = dict(
        graft_from=graft_from,
        dialect=dialect,
        target_vllm=target_vllm,
        device=device,
        workers=workers,
        gpu_workers=gpu_workers,
        max_shard_bytes=max_shard_bytes,
        full_scales=full_scales,
        experts=experts,
        amax=amax,
        recipe=recipe,
    )
    return run_step(
        lambda: convert_step(export_dir, **options),
        dst,
        resume=resume,
        overwrite=overwrite,
        progress=progress,
    )


__all__ = ["convert_checkpoint", "convert_step", "summary_details"]
