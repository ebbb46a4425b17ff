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


@pytest.mark.parametrize("workers, on_device", [(4, 1), (4, 2), (3, 3), (3, 0)])
def test_the_threads_asked_for_run_on_the_device_and_the_rest_on_the_cpu(workers, on_device):
    together = threading.Barrier(workers)  # every job waits for the others: each runs on its own thread

    def where(device: torch.device) -> tuple[str, torch.device]:
        together.wait(timeout=30)
        return threading.current_thread().name, device

    converters = Converters.of(ACCELERATOR, workers, on_device)
    with producer_pool(converters, "test") as pool:
        seen = [f.result() for f in [pool.submit(where) for _ in range(3 * workers)]]
    threads = dict(seen)
    assert len(seen) == len(set(seen)) * 3 == 3 * workers  # a thread keeps its device from job to job
    assert (
        Counter(threads.values()) == Counter({ACCELERATOR: on_device, CPU: workers - on_device}) - Counter()
    )


def test_converters_default_and_refusals(monkeypatch):
    from pipeline.step_options import DEFAULT_GPU_WORKERS

    monkeypatch.setattr(step_options, "available_cores", lambda: 16)
    assert Converters.of(CPU) == Converters(CPU, 16, 0)
    assert Converters.of(ACCELERATOR) == Converters(ACCELERATOR, 16, DEFAULT_GPU_WORKERS)
    assert Converters.of(ACCELERATOR, 2) == Converters(ACCELERATOR, 2, min(2, DEFAULT_GPU_WORKERS))
    assert Converters.of(ACCELERATOR, 8, 8) == Converters(ACCELERATOR, 8, 8)
    with pytest.raises(DsV4Error, match=r"--gpu-workers 9: between 0 and --workers \(8\)"):
        Converters.of(ACCELERATOR, 8, 9)
    with pytest.raises(DsV4Error, match="--gpu-workers 2: the device is the CPU"):
        Converters.of(CPU, 8, 2)
