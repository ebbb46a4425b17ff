"""The converter pool (pipeline.checkpoint.producer.producer_pool): each worker runs torch's CPU ops on
its share of the cores, not on every core (16 workers x 16 OpenMP threads each was 256 threads on 16
cores), and the caller's thread count is what it was once the pool is left, normally or on an error."""

import threading

import pytest
import torch

import pipeline.step_options as step_options
from pipeline.checkpoint.producer import intra_op_threads, producer_pool

pytestmark = pytest.mark.unit


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
    with producer_pool(workers, "test") as pool:
        seen = [f.result() for f in [pool.submit(torch.get_num_threads) for _ in range(4 * workers)]]
    assert set(seen) == {15 // workers}
    assert torch.get_num_threads() == before


def test_the_callers_count_is_restored_after_an_error(monkeypatch):
    monkeypatch.setattr(step_options, "available_cores", lambda: 4)
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="stop"), producer_pool(4, "test") as pool:
        assert pool.submit(torch.get_num_threads).result() == 1
        raise RuntimeError("stop")
    assert torch.get_num_threads() == before
    # and a thread started later begins with it again (torch.set_num_threads in a worker sets that too)
    later: list[int] = []
    thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert later == [before]
