"""`dsv4 slice` as a streaming step: its plan (pipeline/slice/plan.py) and a producer handed to
pipeline.streaming_step, which writes them through the crash-safe writer; the output is validated after.
And the dry-run table."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from pipeline.checkpoint import CONFIG_NAME, Layout, ShardPlan, ensure_valid
from pipeline.progress import Progress
from pipeline.step_options import DEFAULT_SHARD_BYTES
from pipeline.streaming_step import Step, StepResult, run_step

from .plan import SlicePlan, plan_slice, produce_tensor
from .selection import DEFAULT_EXPERTS, DEFAULT_LAYERS, KINDS, REPORT_NAME, STEP, layer_kinds


def slice_step(
    src: str | Path,
    *,
    layers: int | Sequence[int] = DEFAULT_LAYERS,
    experts: int = DEFAULT_EXPERTS,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    full_scales: bool = False,
) -> Step:
    """Validate ``src`` (release layout) and plan the slice: the step that
    :func:`pipeline.streaming_step.run_step` runs; it validates the output too."""
    ckpt = ensure_valid(src, expect=Layout.RELEASE, step=STEP, full_scales=full_scales)
    plan = plan_slice(ckpt, layers, experts, max_shard_bytes)

    def producer(meter: Progress):
        def produce(shard: ShardPlan):
            for t in shard.tensors:
                tensor = produce_tensor(plan, t.key)
                meter.advance(plan.sources[t.key].info.nbytes, t.key)
                yield t.key, tensor

        return produce

    kept = ", ".join(f"{new}<-{old}" for new, old in enumerate(plan.layers))
    return Step(
        name="slice",
        plan=plan,
        inputs=[plan.source],
        output=plan.output,
        read_bytes=plan.read_bytes,
        producer=producer,
        headline=f"layers {kept}, {plan.experts} experts; {len(plan.output.weight_map)} tensors",
        counts=Counter(s.action for s in plan.sources.values()),
        files={
            name: json.dumps(obj, indent=2) + "\n"
            for name, obj in ((CONFIG_NAME, plan.config), (REPORT_NAME, plan.report()))
        },
        copies=plan.extra_files,
        check_output=lambda out: ensure_valid(
            out, expect=Layout.RELEASE, step=f"{STEP} (its output)", full_scales=True
        ),
    )


def slice_checkpoint(
    src: str | Path,
    dst: str | Path,
    *,
    layers: int | Sequence[int] = DEFAULT_LAYERS,
    experts: int = DEFAULT_EXPERTS,
    resume: bool = False,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    full_scales: bool = False,
    progress: bool = True,
) -> StepResult:
    """Validate ``src`` (release layout), plan, write the slice to ``dst``, validate it."""
    options = dict(layers=layers, experts=experts, max_shard_bytes=max_shard_bytes, full_scales=full_scales)
    return run_step(
        lambda: slice_step(src, **options), dst, resume=resume, overwrite=overwrite, progress=progress
    )


def dry_run_table(plan: SlicePlan, dst: str | Path) -> str:
    """What a run would write, from headers alone."""
    lines = [f"slice plan: {plan.source} -> {dst}"]
    src_cfg = plan.source_config
    for new, old in enumerate(plan.layers):
        kinds = ", ".join(k for k in KINDS if k in layer_kinds(src_cfg, old))
        lines.append(f"  layers.{new} <- layers.{old} ({kinds})")
    mtp = plan.config.get("num_nextn_predict_layers", 0)
    lines.append(
        f"  experts: the first {plan.experts} of {src_cfg['n_routed_experts']} per layer"
        + (f" and MTP block ({mtp})" if mtp else "")
    )
    for key, n in plan.rerouted.items():
        lines.append(f"  {key}: {n} of {plan.config['vocab_size']} tokens rerouted onto the kept experts")
    lines.append(
        f"  output: {len(plan.output.weight_map)} tensors, {len(plan.output.shards)} shard(s), "
        f"{plan.output.total_bytes / 1e9:.2f} GB"
    )
    return "\n".join(lines)


__all__ = ["dry_run_table", "slice_checkpoint", "slice_step"]
