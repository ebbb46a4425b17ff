"""The converter pool (pipeline.checkpoint.producer.producer_pool): each worker runs torch's CPU ops on
its share of the cores, not on every core (16 workers x 16 OpenMP threads each was 256 threads on 16
cores), and the caller's thread count is what it was once the pool is left, normally or on an error; on
a GPU, the threads asked for run their jobs there and the others on the CPU (Converters)."""

import threading
from collections import Counter

import pytest
import torch

import pipeline.step_options as step_options
from pipeline.checkpoint.producer import Converters, intra_op_threads, producer_pool
from pipeline.errors import DsV4Error

pytestmark = pytest.mark.unit

CPU = torch.device("cpu")
# a device that is not the CPU and needs no GPU: the pool only hands it to the job (and makes a stream
# for it only when it is CUDA)
ACCELERATOR = torch.device("meta")


def _threads(device: torch.device) -> int:
    return torch.get_num_threads()


@pytest.mark.parametrize(
    "cores, workers, threads", [(16, 16, 1), (16, 4, 4), (16, 3, 5), (2, 16, 1), (2, 1, 2), (1, 1, 1)]
)
def test_intra_op_threads_share_the_cores(monkeypatch, cores, workers, threads):
    monkeypatch.setattr(step_options, "available_cores", lambda: cores)
    assert intra_op_threads(workers) == threads


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_workers_run_torch_on_their_share(monkeypatch, workers):
    monkeypatch.setattr(step_options, "available_cores", lambda: 15)
    before = torch.get_num_threads()
    with producer_pool(Converters.of(CPU, workers), "test") as pool:
        seen = [f.result() for f in [pool.submit(_threads) for _ in range(4 * workers)]]
    assert set(seen) == {15 // workers}
    assert torch.get_num_threads() == before


def test_the_callers_count_is_restored_after_an_error(monkeypatch):
    monkeypatch.setattr(step_options, "available_cores", lambda: 4)
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="stop"), producer_pool(Converters.of(CPU, 4), "test") as pool:
        assert pool.submit(_threads).result() == 1
        raise RuntimeError("stop")
    assert torch.get_num_threads() == before
    # and a thread started later begins with it again (torch.set_num_threads in a worker sets that too)
    later: list[int] = []
    thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert later == [before]


def _where(device: torch.device) -> tuple[str, torch.device]:
    return threading.current_thread().name, device


@pytest.mark.parametrize("workers, gpu_workers", [(3, 1), (2, 2), (0, 2), (3, 0)])
def test_jobs_that_ask_for_the_gpu_take_its_free_threads_and_the_rest_run_on_the_cpu(workers, gpu_workers):
    converters = Converters.of(ACCELERATOR, workers, gpu_workers)
    release = threading.Event()

    def held(device: torch.device):  # keeps its thread busy until released
        release.wait(timeout=30)
        return _where(device)

    with producer_pool(converters, "test") as pool:
        # as many jobs asking for the GPU as there are GPU threads, then one more, and one not asking
        asking = [pool.submit(held, gpu=True) for _ in range(gpu_workers + 1)]
        other = pool.submit(held)
        release.set()
        asked = [f.result() for f in asking]
    where_asked = Counter(device for _, device in asked)
    if workers == 0:  # no CPU thread: everything on the GPU
        assert where_asked == Counter({ACCELERATOR: gpu_workers + 1})
        assert other.result()[1] == ACCELERATOR
        return
    # every GPU thread got one, and the job that found them all busy went to a CPU thread
    assert where_asked == Counter({ACCELERATOR: gpu_workers, CPU: 1}) - Counter()
    assert other.result()[1] == CPU  # a job that does not ask never goes to the GPU
    gpu_threads = {name for name, device in asked if device == ACCELERATOR}
    assert len(gpu_threads) == gpu_workers


def test_a_gpu_thread_is_asked_again_once_free():
    with producer_pool(Converters.of(ACCELERATOR, 1, 1), "test") as pool:
        # one after the other: each finds the one GPU thread free again
        seen = [pool.submit(_where, gpu=True).result() for _ in range(5)]
    assert {device for _, device in seen} == {ACCELERATOR}
    assert len({name for name, _ in seen}) == 1


def test_converters_default_and_refusals(monkeypatch):
    from pipeline.step_options import DEFAULT_GPU_WORKERS

    monkeypatch.setattr(step_options, "available_cores", lambda: 16)
    assert Converters.of(CPU) == Converters(CPU, 16, 0)
    assert Converters.of(ACCELERATOR) == Converters(ACCELERATOR, 16, DEFAULT_GPU_WORKERS)
    assert Converters.of(ACCELERATOR, 0, 8).threads == 8
    for args, message in [
        ((CPU, 8, 2), "--gpu-workers 2: the device is the CPU"),
        ((CPU, 0, None), "--workers 0 leaves no converter thread on the CPU"),
        ((ACCELERATOR, 0, 0), "no converter thread at all"),
        ((ACCELERATOR, -1, 2), "a count is at least 0"),
    ]:
        with pytest.raises(DsV4Error, match=message):
            Converters.of(*args)
