"""The producer of `dsv4 convert`: the writer asks for each shard's tensors in plan order; this runs the
job behind each (``workers`` ahead, in threads) and hands its outputs over as their turn comes."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future

import torch

from pipeline.checkpoint import ShardPlan, producer_pool

from .plan import ConvertPlan
from .runners import RunStats, run_job


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


__all__ = ["make_producer"]
