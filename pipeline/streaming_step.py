"""The one skeleton of a streaming step (`dsv4 dequant`, `slice`, `convert`, and any step like them).

A step supplies only what is its own, as a :class:`Step`:

* a plan, made from headers alone before anything is written: the output tensors in shards
  (:class:`pipeline.checkpoint.OutputPlan`), the inputs it reads, how many bytes it reads, the small files
  it writes beside the shards (config.json, a report: name -> text) and those it copies unchanged;
* a producer: given the progress meter, a function that yields each shard's tensors in plan order.

:func:`run_step` does the rest, the same for every step: time the run (validation and planning
included), plan, draw progress, write the small files into a temporary folder, write everything through
:func:`pipeline.checkpoint.write_checkpoint` (crash-safe, ``resume`` byte-identical, one run per output
folder), check the output when the step asks for it, and return one :class:`StepResult`, whose
:meth:`~StepResult.summary` is the line every step prints.
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.checkpoint.writer import OutputPlan, Producer, write_checkpoint
from pipeline.progress import Progress


def _no_details() -> list[str]:
    return []


@dataclass
class Step:
    """What one streaming step supplies: its plan (from headers) and its producer."""

    name: str  # "dequant": the progress label, the summary's first word, the temporary folder's prefix
    plan: Any  # the step's own plan, kept on the result (dry-run tables and tests read it)
    inputs: Sequence[Path]  # the input checkpoint folders (the writer refuses an output inside one)
    output: OutputPlan
    read_bytes: int  # what the producer reads: the progress total and the summary's rate
    producer: Callable[[Progress], Producer]  # given the meter it advances
    headline: str  # what was written, for the summary: "123 tensors (45 FP8, ...)"
    counts: Counter = field(default_factory=Counter)  # the output tensors by kind, as the step counts them
    stats: Any = None  # what the producer measures while it runs (read by ``details``)
    files: Mapping[str, str] = field(default_factory=dict)  # written beside the shards: name -> text
    copies: Sequence[Path] = ()  # files copied unchanged (tokenizer files, ...)
    details: Callable[[], list[str]] = _no_details  # lines under the summary, asked for after the run
    check_output: Callable[[Path], object] | None = None  # run on the finished output folder


@dataclass
class StepResult:
    """What a streaming step did; :meth:`summary` is the line it prints."""

    name: str
    out_dir: Path
    plan: Any
    headline: str
    counts: Counter
    stats: Any
    read_bytes: int
    written_bytes: int
    seconds: float
    shards_written: int
    shards_kept: int
    details: list[str] = field(default_factory=list)

    def summary(self) -> str:
        rate = self.read_bytes / self.seconds / 1e9 if self.seconds else 0.0
        kept = f" ({self.shards_kept} kept from an earlier run)" if self.shards_kept else ""
        line = (
            f"{self.name}: {self.out_dir}: {self.headline}; read {self.read_bytes / 1e9:.2f} GB, wrote "
            f"{self.written_bytes / 1e9:.2f} GB in {self.shards_written + self.shards_kept} shard(s){kept}; "
            f"{self.seconds:.1f} s, {rate:.2f} GB/s read"
        )
        return "\n".join([line, *self.details])


def run_step(
    plan_step: Callable[[], Step],
    dst: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> StepResult:
    """Plan the step (``plan_step`` validates its inputs and plans from headers), write its output to
    ``dst`` and return what it did. ``resume``/``overwrite``: as :func:`write_checkpoint` takes them."""
    start = time.perf_counter()
    step = plan_step()
    meter = Progress(step.name, step.read_bytes, enabled=progress)
    with tempfile.TemporaryDirectory(prefix=f"dsv4-{step.name}-") as tmp:
        extras = list(step.copies)
        for name, text in step.files.items():
            path = Path(tmp) / name
            path.write_text(text)
            extras.append(path)
        written = write_checkpoint(
            step.output,
            dst,
            step.producer(meter),
            inputs=list(step.inputs),
            extra_files=extras,
            resume=resume,
            overwrite=overwrite,
            progress=meter.message if progress else None,
        )
    meter.close()
    if step.check_output is not None:
        step.check_output(written.out_dir)
    return StepResult(
        step.name,
        written.out_dir,
        step.plan,
        step.headline,
        step.counts,
        step.stats,
        step.read_bytes,
        step.output.total_bytes,
        time.perf_counter() - start,
        len(written.written),
        len(written.skipped),
        step.details(),
    )


__all__ = ["Step", "StepResult", "run_step"]
