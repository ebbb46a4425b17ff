"""The producer side of :func:`.writer.write_checkpoint`: a producer gets one planned shard and
yields its tensors in plan order, made however the step makes them (ahead, in :func:`producer_pool`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

from .output_plan import PlannedTensor, ShardPlan

# A producer gets one ShardPlan and yields (key, tensor) for its tensors, in plan order.
Producer = Callable[[ShardPlan], Iterable[tuple[str, torch.Tensor]]]


def per_tensor(fn: Callable[[PlannedTensor], torch.Tensor]) -> Producer:
    """A Producer from a function that makes one planned tensor at a time."""

    def produce(shard: ShardPlan) -> Iterator[tuple[str, torch.Tensor]]:
        for t in shard.tensors:
            yield t.key, fn(t)

    return produce


@contextlib.contextmanager
def producer_pool(workers: int, name: str) -> Iterator[ThreadPoolExecutor]:
    """The thread pool a producer converts ahead in. Leaving it normally waits for the work; leaving it
    on an error, Ctrl-C or the writer closing the producer cancels the queued work and does not wait for
    the running jobs, so an interrupt is not held up by tensors nobody will write."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


class Ahead:
    """How far a producer's jobs may run ahead of the writer: at most ``jobs`` jobs and ``budget`` bytes
    started and not yet handed over, and always the job the writer waits for, however large.

    Counting bytes, not tensors, is what bounds memory when tensors differ in size by 10^6 (a norm
    and an expert); counting jobs keeps thousands of tiny ones from queueing at once."""

    def __init__(self, jobs: int, budget: int) -> None:
        self.jobs = max(1, jobs)
        self.budget = budget

    def room(self, running: int, running_bytes: int, nbytes: int) -> bool:
        """Whether a job of ``nbytes`` may start beside ``running`` jobs holding ``running_bytes``."""
        return running == 0 or (running < self.jobs and running_bytes + nbytes <= self.budget)
