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


def intra_op_threads(workers: int) -> int:
    """The threads each of ``workers`` converter threads gives one torch CPU op: the cores left to it.

    torch's default is every core for each calling thread, and with OpenMP every calling thread gets a
    team of its own: 16 converters on 16 cores were 256 threads competing for the cores."""
    from pipeline.step_options import available_cores

    return max(1, available_cores() // max(1, workers))


def _start_worker(threads: int, device: torch.device | None) -> None:
    torch.set_num_threads(threads)
    if device is not None and device.type == "cuda":
        # a stream of this thread's own: on the one default stream, every worker's copy back to the host
        # waited for the kernels every other worker had queued before it
        torch.cuda.set_stream(torch.cuda.Stream(device))


@contextlib.contextmanager
def producer_pool(
    workers: int, name: str, device: torch.device | None = None
) -> Iterator[ThreadPoolExecutor]:
    """The thread pool a producer converts ahead in: ``workers`` threads, each running torch's CPU ops on
    :func:`intra_op_threads` threads and, on CUDA, its kernels and copies on a stream of its own.

    Leaving it normally waits for the work; leaving it on an error, Ctrl-C or the writer closing the
    producer cancels the queued work and does not wait for the running jobs, so an interrupt is not held
    up by tensors nobody will write."""
    previous = torch.get_num_threads()
    pool = ThreadPoolExecutor(
        max_workers=workers,
        thread_name_prefix=name,
        initializer=_start_worker,
        initargs=(intra_op_threads(workers), device),
    )
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    else:
        pool.shutdown(wait=True)
    finally:
        # torch.set_num_threads in a worker also sets the count that threads started later begin with
        torch.set_num_threads(previous)


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
