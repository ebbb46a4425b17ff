"""How far a producer runs ahead of the writer (pipeline.checkpoint.producer.Ahead), and that the
dequant producer keeps to it: its converters never hold more than the window's jobs and bytes."""

import threading
import time
from types import SimpleNamespace

import pytest
import torch

import pipeline.dequant as D
from pipeline.checkpoint import Ahead, Converters, PlannedTensor
from pipeline.checkpoint.output_plan import plan_shards

pytestmark = pytest.mark.unit


def test_room():
    ahead = Ahead(jobs=3, budget=100)
    assert ahead.room(0, 0, 10**9)  # the job the writer waits for always starts, however large
    assert ahead.room(1, 50, 50) and not ahead.room(1, 50, 51)  # the byte budget
    assert ahead.room(2, 0, 1) and not ahead.room(3, 0, 1)  # the job count
    assert Ahead(jobs=0, budget=0).jobs == 1


@pytest.mark.parametrize("jobs, budget", [(1, 0), (3, 10**9), (8, 2500)])
def test_dequant_producer_keeps_to_the_window(monkeypatch, jobs, budget):
    sizes = [1000, 10, 3000, 500, 500, 500, 20, 2000, 1]
    planned = [PlannedTensor(f"t{i}", "U8", (n,)) for i, n in enumerate(sizes)]
    live: dict[str, int] = {}  # started and not yet handed to the writer
    broken, lock = [], threading.Lock()

    def convert(src, device):  # a stand-in conversion that checks what is in flight when it starts
        with lock:
            live[src.key] = src.n
            if len(live) > jobs or (len(live) > 1 and sum(live.values()) > budget):
                broken.append(dict(live))
        return torch.zeros(src.n, dtype=torch.uint8)

    monkeypatch.setattr(D, "convert", convert)
    sources = {p.key: SimpleNamespace(key=p.key, n=p.nbytes, read_bytes=p.nbytes) for p in planned}
    plan = SimpleNamespace(sources=sources)
    shard = plan_shards(planned, max_shard_bytes=10**9).shards[0]
    produce = D.make_producer(plan, Converters.of(torch.device("cpu"), 2), None, Ahead(jobs, budget))
    got = []
    for key, t in produce(shard):  # the generator is suspended here: nothing new starts meanwhile
        with lock:
            live.pop(key)
        got.append((key, t.numel()))
    assert got == [(p.key, p.nbytes) for p in planned]  # every tensor, in plan order
    assert not broken, broken


def test_dequant_producer_runs_ahead_across_a_shards_end(monkeypatch):
    """Streaming several shards, the converters start the next shard's tensors before the writer has
    the last of the current one (per shard, the pool emptied at each shard's end)."""
    planned = [PlannedTensor(f"t{i}", "U8", (100,)) for i in range(12)]
    live: set[str] = set()
    lock = threading.Lock()

    def convert(src, device):
        with lock:
            live.add(src.key)
        return torch.zeros(src.n, dtype=torch.uint8)

    monkeypatch.setattr(D, "convert", convert)
    plan = SimpleNamespace(
        sources={p.key: SimpleNamespace(key=p.key, n=p.nbytes, read_bytes=p.nbytes) for p in planned}
    )
    shards = plan_shards(planned, max_shard_bytes=400).shards
    assert [len(s.tensors) for s in shards] == [4, 4, 4]
    produce = D.make_producer(plan, Converters.of(torch.device("cpu"), 2), None, Ahead(6, 10**9))
    got = []
    for key, _ in produce.across(shards):
        if key == shards[0].tensors[-1].key:
            time.sleep(0.2)  # the converters have had time to start all they may
            with lock:
                ahead_of_the_end = live & {t.key for t in shards[1].tensors}
            assert ahead_of_the_end, "nothing of the second shard was started before the first was written"
        got.append(key)
    assert got == [p.key for p in planned]
