"""The producer side of :func:`.writer.write_checkpoint`: a producer gets one planned shard and
yields its tensors in plan order, made however the step makes them (ahead, in :func:`producer_pool`)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .output_plan import PlannedTensor, ShardPlan

# A producer gets one ShardPlan and yields (key, tensor) for its tensors, in plan order. An AcrossShards
# producer can also stream every shard the writer will write in one go.
Producer = Callable[[ShardPlan], Iterable[tuple[str, torch.Tensor]]]


def per_tensor(fn: Callable[[PlannedTensor], torch.Tensor]) -> Producer:
    """A Producer from a function that makes one planned tensor at a time."""

    def produce(shard: ShardPlan) -> Iterator[tuple[str, torch.Tensor]]:
        for t in shard.tensors:
            yield t.key, fn(t)

    return produce


class AcrossShards:
    """A producer that can also stream the tensors of several shards as one: ``across(shards)`` yields
    every tensor of ``shards`` in order, its converters running ahead across each shard's end.

    Called per shard, a converter pool empties at each shard's end: its last jobs run with the other
    converters idle, the writer's closing fsync and journal update run with every converter idle, and
    the next shard's first tensors then start from nothing. The writer takes ``across`` when a producer
    has it (pipeline.checkpoint.writer); a V4 Pro run writes 180 to 650 shards."""

    def __init__(self, stream: Callable[[list[ShardPlan]], Iterator[tuple[str, torch.Tensor]]]) -> None:
        self.across = stream

    def __call__(self, shard: ShardPlan) -> Iterator[tuple[str, torch.Tensor]]:
        return self.across([shard])


def intra_op_threads(workers: int) -> int:
    """The threads each of ``workers`` converter threads gives one torch CPU op: the cores left to it.

    torch's default is every core for each calling thread, and with OpenMP every calling thread gets a
    team of its own: 16 converters on 16 cores were 256 threads competing for the cores."""
    from pipeline.step_options import available_cores

    return max(1, available_cores() // max(1, workers))


CPU = torch.device("cpu")


@dataclass(frozen=True)
class Converters:
    """A step's converter threads: ``workers`` converting on the CPU and, with a CUDA ``device``,
    ``gpu_workers`` more feeding the GPU.

    A job goes to a GPU thread when it asks for one (its kernel is arithmetic the GPU does many times
    faster: re-quantizing, NVFP4 <-> FP8) and one is free; every other job, and those that find the GPU
    threads busy, to a CPU thread. The CPU's table kernels (dequantizing, transcoding) and copies keep
    up with the disk on 16 cores, and on the GPU they cost a copy there and back: 16 threads all feeding
    an H100 were slower than the CPU alone (docs/benchmarks.md). With no CPU threads (``workers`` 0)
    every job runs on the GPU. Every format function gives the same bytes on either
    (tests/device/test_cuda_paths.py), so where a tensor ran never shows in the output."""

    device: torch.device
    workers: int
    gpu_workers: int

    @classmethod
    def of(
        cls, device: torch.device, workers: int | None = None, gpu_workers: int | None = None
    ) -> Converters:
        """``workers`` CPU threads (unset: one per core; 0: none, only with a GPU) and, on a CUDA
        ``device``, ``gpu_workers`` GPU threads (unset: :data:`~pipeline.step_options.DEFAULT_GPU_WORKERS`);
        errors name the option."""
        from pipeline.errors import DsV4Error
        from pipeline.step_options import DEFAULT_GPU_WORKERS, available_cores

        workers = available_cores() if workers is None else workers
        if workers < 0 or (gpu_workers or 0) < 0:
            raise DsV4Error(f"--workers {workers}, --gpu-workers {gpu_workers}: a count is at least 0")
        if device.type == "cpu":
            if gpu_workers:
                raise DsV4Error(
                    f"--gpu-workers {gpu_workers}: the device is the CPU (--device cuda for a GPU)"
                )
            if workers == 0:
                raise DsV4Error(
                    "--workers 0 leaves no converter thread on the CPU (it means: all on the GPU)"
                )
            return cls(device, workers, 0)
        gpu_workers = DEFAULT_GPU_WORKERS if gpu_workers is None else gpu_workers
        if workers + gpu_workers == 0:
            raise DsV4Error("--workers 0 --gpu-workers 0: no converter thread at all")
        return cls(device, workers, gpu_workers)

    @property
    def threads(self) -> int:
        return self.workers + self.gpu_workers


def _start_worker(threads: int, device: torch.device) -> None:
    torch.set_num_threads(threads)
    if device.type == "cuda":
        # a stream of this thread's own: on the one default stream, every worker's copy back to the host
        # waited for the kernels every other worker had queued before it
        torch.cuda.set_stream(torch.cuda.Stream(device))


class ConverterPool:
    """The converter threads of :func:`producer_pool`. ``submit(fn, *args, gpu=...)`` runs ``fn(*args,
    device=...)`` on a GPU thread, with the GPU, when ``gpu`` asks for it and one is free (or when there
    is no CPU thread); else on a CPU thread, with the CPU."""

    def __init__(
        self, converters: Converters, cpu: ThreadPoolExecutor | None, gpu: ThreadPoolExecutor | None
    ):
        self._device = converters.device
        self._gpu_threads = converters.gpu_workers
        self._cpu, self._gpu = cpu, gpu
        self._lock = threading.Lock()
        self._on_gpu = 0  # jobs given to the GPU threads and not finished

    def submit(self, fn: Callable, /, *args, gpu: bool = False) -> Future:
        if self._gpu is not None and (self._cpu is None or (gpu and self._take_gpu_thread())):
            future = self._gpu.submit(fn, *args, device=self._device)
            future.add_done_callback(self._free_gpu_thread)
            return future
        assert self._cpu is not None
        return self._cpu.submit(fn, *args, device=CPU)

    def _take_gpu_thread(self) -> bool:
        with self._lock:
            if self._on_gpu >= self._gpu_threads:
                return False
            self._on_gpu += 1
            return True

    def _free_gpu_thread(self, future: Future) -> None:
        with self._lock:
            self._on_gpu -= 1


@contextlib.contextmanager
def producer_pool(converters: Converters, name: str) -> Iterator[ConverterPool]:
    """The thread pools a producer converts ahead in: ``converters.workers`` CPU threads, each running
    torch's CPU ops on :func:`intra_op_threads` threads, and ``converters.gpu_workers`` GPU threads, each
    with a CUDA stream of its own.

    Leaving it normally waits for the work; leaving it on an error, Ctrl-C or the writer closing the
    producer cancels the queued work and does not wait for the running jobs, so an interrupt is not held
    up by tensors nobody will write."""
    previous = torch.get_num_threads()
    threads = intra_op_threads(converters.workers or 1)
    pools = {
        device: ThreadPoolExecutor(
            max_workers=count,
            thread_name_prefix=f"{name}-{device.type}",
            initializer=_start_worker,
            initargs=(threads, device),
        )
        for device, count in ((CPU, converters.workers), (converters.device, converters.gpu_workers))
        if count
    }
    gpu = pools.get(converters.device) if converters.device.type != "cpu" else None
    try:
        yield ConverterPool(converters, pools.get(CPU), gpu)
    except BaseException:
        for pool in pools.values():
            pool.shutdown(wait=False, cancel_futures=True)
        raise
    else:
        for pool in pools.values():
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
