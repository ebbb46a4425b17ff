"""The producer of `dsv4 convert`: the writer asks for each shard's tensors in plan order; this runs the
job behind each (ahead of the writer, in threads) and hands its outputs over as their turn comes."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future

import torch

from pipeline.checkpoint import AcrossShards, Ahead, Converters, ShardPlan, producer_pool
from pipeline.step_options import default_ahead_bytes

from .plan import ConvertPlan
from .runners import GPU_ACTIONS, RunStats, run_job


def make_producer(
    plan: ConvertPlan,
    converters: Converters,
    stats: RunStats,
    progress,
    ahead: Ahead | None = None,
):
    """Writer producer: runs each output's job on the ``converters`` threads, starting the jobs of the outputs
    after the one being written as far as ``ahead`` allows (counted in bytes read), and keeps a job's
    other outputs (an FP8 weight's scale, w3's unified scales) until their turn comes.

    The window is counted in jobs, not in output keys: a job with several outputs (w1 and w3 of an
    expert transcoded together: six keys) once used up the whole lookahead, leaving converters idle."""
    ahead = ahead or Ahead(4 * converters.threads, default_ahead_bytes())
    done: dict[str, torch.Tensor] = {}

    def produce(shards: list[ShardPlan]) -> Iterator[tuple[str, torch.Tensor]]:
        with producer_pool(converters, "convert") as pool:  # Ctrl-C does not wait for it
            running: dict[str, Future] = {}
            in_flight = 0

            def start(key: str) -> None:
                nonlocal in_flight
                name = plan.job_of[key]
                if key not in done and name not in running:
                    job = plan.jobs[name]
                    running[name] = pool.submit(run_job, job, stats, gpu=job.action in GPU_ACTIONS)
                    in_flight += plan.jobs[name].read_bytes

            def finish(key: str) -> tuple[str, torch.Tensor]:
                nonlocal in_flight
                if key in done:
                    return key, done.pop(key)
                name = plan.job_of[key]
                job = plan.jobs[name]
                if name not in running:
                    start(key)
                results = running.pop(name).result()
                in_flight -= job.read_bytes
                if progress is not None:
                    progress.advance(job.read_bytes, key)
                for k, t in zip(job.outputs, results, strict=True):
                    if k != key:
                        done[k] = t
                return key, results[job.outputs.index(key)]

            keys = [planned.key for shard in shards for planned in shard.tensors]
            started = 0
            for i, key in enumerate(keys):
                # never behind the key being written: a job started for a key already written would
                # run again
                while started < len(keys) and (
                    started <= i
                    or ahead.room(len(running), in_flight, plan.jobs[plan.job_of[keys[started]]].read_bytes)
                ):
                    start(keys[started])
                    started += 1
                yield finish(key)

    return AcrossShards(produce)


__all__ = ["make_producer"]
