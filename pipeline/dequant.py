"""Release layout (FP8 + UE8M0 tiles, MXFP4 experts) -> BF16 under the release's own key names.

Output naming: the release's native names (`layers.N.attn.wq_a.weight`, `...experts.E.w1.weight`),
each quantized `.weight` replaced by its BF16 value and its `.scale` dropped; every other tensor copied
byte for byte. transformers 5.23 converts these names itself when it loads the directory as
`DeepseekV4ForCausalLM`, and keeping them means every later step reads one dialect (N) from the release
and its BF16 copy alike.

The work is planned from headers alone (so sizes, disk needs and the index are known first), then
streamed tensor by tensor through pipeline.checkpoint's crash-safe writer: a killed run resumes and the
result is byte-identical. Conversions run on the GPU when there is one, in a small pool of threads that
keeps the next tensors converting while the current one is written.
"""

from __future__ import annotations

import json
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.checkpoint import (
    CONFIG_NAME,
    AcrossShards,
    Ahead,
    Checkpoint,
    Converters,
    Layout,
    OutputPlan,
    PlannedTensor,
    ShardPlan,
    TensorInfo,
    ensure_valid,
    plan_shards,
    producer_pool,
    read_tensor,
)
from pipeline.checkpoint.folder import files_to_copy, free_disk
from pipeline.checkpoint.validate import check_read_values
from pipeline.device import resolve_device
from pipeline.errors import DsV4Error
from pipeline.formats import (
    E2M1_MAX,
    FP8_E4M3_MAX,
    fp8_block_dequantize,
    mxfp4_dequantize,
    ue8m0_products_finite,
)
from pipeline.progress import Progress
from pipeline.release_layout import FP8, MXFP4, PLAIN, WEIGHT_SUFFIX, scale_key, stored_format
from pipeline.step_options import DEFAULT_SHARD_BYTES, default_ahead_bytes
from pipeline.streaming_step import Step, StepResult, run_step

STEP = "dsv4 dequant"
OUT_DTYPE = "BF16"


@dataclass(frozen=True)
class Source:
    """Where an output tensor comes from: a stored weight, and its scale when it is quantized."""

    fmt: str  # FP8, MXFP4 or PLAIN (copied)
    weight: TensorInfo
    scale: TensorInfo | None = None

    @property
    def read_bytes(self) -> int:
        return self.weight.nbytes + (self.scale.nbytes if self.scale else 0)


@dataclass
class DequantPlan:
    source: Path
    output: OutputPlan
    sources: dict[str, Source]
    config: dict | None
    extra_files: list[Path] = field(default_factory=list)

    def counts(self) -> Counter:
        return Counter(s.fmt for s in self.sources.values())

    @property
    def read_bytes(self) -> int:
        return sum(s.read_bytes for s in self.sources.values())


def _output_tensor(src: Source) -> PlannedTensor:
    if src.fmt == FP8:
        return PlannedTensor(src.weight.key, OUT_DTYPE, src.weight.shape)
    if src.fmt == MXFP4:
        rows, packed = src.weight.shape
        return PlannedTensor(src.weight.key, OUT_DTYPE, (rows, 2 * packed))
    return PlannedTensor(src.weight.key, src.weight.dtype, src.weight.shape)


def plan_dequant(ckpt: Checkpoint, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> DequantPlan:
    """Every output tensor, in input shard and file order (so each input shard is read front to back)."""
    tensors = ckpt.tensors
    sources: dict[str, Source] = {}
    consumed: set[str] = set()
    for shard in ckpt.shards.values():
        for info in sorted(shard.tensors.values(), key=lambda i: i.begin):
            key = info.key
            if key.endswith(WEIGHT_SUFFIX):
                scale = tensors.get(scale_key(key))
                fmt = stored_format(info.dtype, scale.dtype if scale else None)
                if fmt != PLAIN:
                    sources[key] = Source(fmt, info, scale)
                    consumed.add(scale.key)
                    continue
            sources[key] = Source(PLAIN, info)
    for key in consumed:
        sources.pop(key, None)  # a scale that sorted before its weight
    planned = [_output_tensor(src) for src in sources.values()]
    output = plan_shards(planned, max_shard_bytes=max_shard_bytes)
    extras = files_to_copy(ckpt.root, rewritten=(CONFIG_NAME,))
    return DequantPlan(ckpt.root, output, sources, ckpt.config, extras)


def bf16_config(config: dict) -> dict:
    """The release config for its BF16 copy: no quantization_config, ``dtype`` bfloat16. ``dtype`` is the
    key transformers 5 reads and writes; the release's deprecated ``torch_dtype`` is dropped (transformers
    still reads it, as ``dtype``, from configs that have it)."""
    out = {k: v for k, v in config.items() if k not in ("quantization_config", "torch_dtype")}
    out["dtype"] = "bfloat16"
    return out


def convert(src: Source, device: torch.device, keep_on_device: bool = False) -> torch.Tensor:
    """The output tensor for one source: dequantized to BF16, or the stored tensor unchanged; on the CPU
    (for the writer), or left on ``device`` with ``keep_on_device`` (dsv4 calibrate puts it in the layer
    there: a V4 Pro layer is 48 GiB of BF16, which a round trip through host memory would copy twice)."""
    weight = read_tensor(src.weight)
    if src.fmt == PLAIN:
        check_read_values(src.weight, weight)
        return weight
    scale = read_tensor(src.scale)
    weight, scale = weight.to(device, non_blocking=True), scale.to(device, non_blocking=True)
    # every scale and FP8 weight, checked where it is read (validation only samples the scales): a bad
    # value stops the run naming its key, before the shard it would land in is complete
    check_read_values(src.scale, scale)
    check_read_values(src.weight, weight)
    if src.fmt == FP8:
        out = fp8_block_dequantize(weight, scale, dtype=torch.bfloat16)
        largest = FP8_E4M3_MAX
    else:
        out = mxfp4_dequantize(weight, scale, torch.bfloat16)
        largest = E2M1_MAX
    # finite scales so large the product overflows BF16: the largest scale byte rules that out for
    # every real checkpoint (scales are UE8M0 in both formats), so the pass over every output value
    # (once 40 % of dequant's CPU time) runs only when the scales cannot rule it out
    proven = ue8m0_products_finite(scale, largest, torch.bfloat16)
    if not proven and not bool(torch.isfinite(out).all()):
        raise DsV4Error(
            f"{src.weight.file}: key {src.weight.key}: dequantized to BF16 it holds "
            f"{int((~torch.isfinite(out)).sum())} non-finite value(s): its scale {src.scale.key} is too "
            "large for BF16; the checkpoint is damaged (re-download it)"
        )
    return out if keep_on_device else out.cpu()


def make_producer(
    plan: DequantPlan,
    converters: Converters,
    progress: Progress | None,
    ahead: Ahead | None = None,
):
    """A writer producer whose converter threads convert the tensors after the one being written, as
    many as ``ahead`` allows (counted in output bytes: BF16 is 3.6x what is read).

    Its jobs ask for no GPU thread: on the CPU they are table lookups that keep up with the disk, and on
    a GPU each would copy 4.6x its input across and back (they run there with no CPU threads)."""
    ahead = ahead or Ahead(4 * converters.threads, default_ahead_bytes())

    def produce(shards: list[ShardPlan]) -> Iterator[tuple[str, torch.Tensor]]:
        with producer_pool(converters, "dequant") as pool:  # Ctrl-C does not wait for it
            pending: deque = deque()
            tensors = [t for shard in shards for t in shard.tensors]
            started, in_flight = 0, 0
            for _ in tensors:
                while started < len(tensors) and ahead.room(len(pending), in_flight, tensors[started].nbytes):
                    planned = tensors[started]
                    pending.append((planned, pool.submit(convert, plan.sources[planned.key])))
                    in_flight += planned.nbytes
                    started += 1
                in_flight -= pending[0][0].nbytes
                yield _finish(pending.popleft(), plan, progress)

    return AcrossShards(produce)


def _finish(item, plan: DequantPlan, progress: Progress | None) -> tuple[str, torch.Tensor]:
    planned, future = item
    tensor = future.result()
    if progress is not None:
        progress.advance(plan.sources[planned.key].read_bytes, planned.key)
    return planned.key, tensor


def dequant_step(
    src: str | Path,
    *,
    device: str = "auto",
    workers: int | None = None,
    gpu_workers: int | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    full_scales: bool = False,
) -> Step:
    """Validate ``src`` (it must be the release layout) and plan its BF16 copy: the step that
    :func:`pipeline.streaming_step.run_step` runs."""
    ckpt = ensure_valid(src, expect=Layout.RELEASE, step=STEP, full_scales=full_scales)
    plan = plan_dequant(ckpt, max_shard_bytes)
    converters = Converters.of(resolve_device(device), workers, gpu_workers)
    counts = plan.counts()
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    files = (
        {} if plan.config is None else {CONFIG_NAME: json.dumps(bf16_config(plan.config), indent=2) + "\n"}
    )
    return Step(
        name="dequant",
        plan=plan,
        inputs=[plan.source],
        output=plan.output,
        read_bytes=plan.read_bytes,
        producer=lambda meter: make_producer(plan, converters, meter),
        headline=f"{sum(counts.values())} tensors ({kinds})",
        counts=counts,
        files=files,
        copies=plan.extra_files,
    )


def dequantize_checkpoint(
    src: str | Path,
    dst: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    device: str = "auto",
    workers: int | None = None,
    gpu_workers: int | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    full_scales: bool = False,
    progress: bool = True,
) -> StepResult:
    """Validate ``src`` (it must be the release layout), plan, and write the BF16 checkpoint to ``dst``."""
    options = dict(
        device=device,
        workers=workers,
        gpu_workers=gpu_workers,
        max_shard_bytes=max_shard_bytes,
        full_scales=full_scales,
    )
    return run_step(
        lambda: dequant_step(src, **options), dst, resume=resume, overwrite=overwrite, progress=progress
    )


def dry_run_table(plan: DequantPlan, dst: str | Path) -> str:
    """What a run would do, from headers alone: tensors by format, bytes, shards, free disk."""
    lines = [f"dequant plan: {plan.source} -> {dst}"]
    by_fmt: dict[str, list[Source]] = {}
    for s in plan.sources.values():
        by_fmt.setdefault(s.fmt, []).append(s)
    names = {FP8: "FP8 block -> BF16", MXFP4: "MXFP4 -> BF16", PLAIN: "copied unchanged"}
    for fmt in (FP8, MXFP4, PLAIN):
        group = by_fmt.get(fmt, [])
        if group:
            read = sum(s.read_bytes for s in group) / 1e9
            lines.append(f"  {names[fmt]:<18} {len(group):>8} tensors  {read:10.2f} GB read")
    probe, free = free_disk(dst)
    lines.append(
        f"  output: {len(plan.output.shards)} shard(s), {plan.output.total_bytes / 1e9:.2f} GB; "
        f"{free / 1e9:.2f} GB free at {probe}"
    )
    if plan.extra_files or plan.config is not None:
        names_copied = [CONFIG_NAME + " (rewritten: no quantization_config)"] * (plan.config is not None)
        names_copied += [p.name for p in plan.extra_files]
        lines.append(f"  also: {', '.join(names_copied)}")
    return "\n".join(lines)


__all__ = [
    "DequantPlan",
    "Source",
    "bf16_config",
    "dequant_step",
    "dequantize_checkpoint",
    "dry_run_table",
    "plan_dequant",
]
