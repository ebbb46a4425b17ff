"""The producer side of :func:`.writer.write_checkpoint`: a producer gets one planned shard and
yields its tensors in plan order, made however the step makes them (ahead, in :func:`producer_pool`)."""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

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


CPU = torch.device("cpu")


@dataclass(frozen=True)
class Converters:
    """A step's converter threads: ``workers`` of them, ``on_device`` of which run their tensors on
    ``device`` and the rest on the CPU, every thread taking the next job as it frees up.

    On a 16-core machine the CPU's table kernels keep up with the GPU's round trip (host -> device ->
    host, pageable), so a GPU that did every tensor alone was slower than the CPU (docs/benchmarks.md);
    a few threads feeding the GPU beside CPU converters use both. Every format function gives the same
    bytes on either (tests/device/test_cuda_paths.py), so where a tensor ran never shows in the output."""

    device: torch.device
    workers: int
    on_device: int

    @classmethod
    def of(
        cls, device: torch.device, workers: int | None = None, gpu_workers: int | None = None
    ) -> Converters:
        """``workers`` threads (unset: one per core); on a CUDA ``device``, ``gpu_workers`` of them on it
        (unset: :data:`~pipeline.step_options.DEFAULT_GPU_WORKERS`, at most ``workers``); errors name the
        option."""
        from pipeline.errors import DsV4Error
        from pipeline.step_options import DEFAULT_GPU_WORKERS, available_cores

        workers = max(1, workers or available_cores())
        if device.type == "cpu":
            if gpu_workers:
                raise DsV4Error(
                    f"--gpu-workers {gpu_workers}: the device is the CPU (--device cuda for a GPU)"
                )
            return cls(device, workers, 0)
        if gpu_workers is None:
            gpu_workers = min(workers, DEFAULT_GPU_WORKERS)
        if not 0 <= gpu_workers <= workers:
            raise DsV4Error(f"--gpu-workers {gpu_workers}: between 0 and --workers ({workers})")
        return cls(device, workers, gpu_workers)

    def describe(self) -> str:
        if self.device.type == "cpu" or self.on_device == 0:
            return f"{self.workers} CPU converter thread(s)"
        return f"{self.workers} converter threads, {self.on_device} of them on {self.device}"


_thread = threading.local()  # .device: where the converter thread running it puts its tensors


def _start_worker(threads: int, converters: Converters, started: Iterator[int]) -> None:
    # the first on_device threads started run on the device: next() on a count is atomic under the GIL
    device = converters.device if next(started) < converters.on_device else CPU
    _thread.device = device
    torch.set_num_threads(threads)
    if device.type == "cuda":
        # a stream of this thread's own: on the one default stream, every worker's copy back to the host
        # waited for the kernels every other worker had queued before it
        torch.cuda.set_stream(torch.cuda.Stream(device))


def _on_thread_device(fn: Callable, args: tuple):
    return fn(*args, device=_thread.device)


class ConverterPool:
    """The converter threads of :func:`producer_pool`: ``submit(fn, *args)`` runs ``fn(*args,
    device=...)`` on the next free thread, with that thread's device."""

    def __init__(self, executor: ThreadPoolExecutor) -> None:
        self._executor = executor

    def submit(self, fn: Callable, /, *args) -> Future:
        return self._executor.submit(_on_thread_device, fn, args)


@contextlib.contextmanager
def producer_pool(converters: Converters, name: str) -> Iterator[ConverterPool]:
    """The thread pool a producer converts ahead in: ``converters.workers`` threads, each running torch's
    CPU ops on :func:`intra_op_threads` threads; those on CUDA run their kernels and copies on a stream
    of their own.

    Leaving it normally waits for the work; leaving it on an error, Ctrl-C or the writer closing the
    producer cancels the queued work and does not wait for the running jobs, so an interrupt is not held
    up by tensors nobody will write."""
    previous = torch.get_num_threads()
    pool = ThreadPoolExecutor(
        max_workers=converters.workers,
        thread_name_prefix=name,
        initializer=_start_worker,
        initargs=(intra_op_threads(converters.workers), converters, itertools.count()),
    )
    try:
        yield ConverterPool(pool)
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
