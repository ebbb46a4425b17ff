"""`dsv4 slice` planned on the full release layout (the sparse replica: real headers, holes for data):
the canary's 2 layers x 8 experts of V4 Pro, from headers alone."""

from __future__ import annotations

import json

import pytest

from pipeline.checkpoint import Checkpoint
from pipeline.cli import main as dsv4
from pipeline.release_layout import release_tensors
from pipeline.slice import plan_slice

pytestmark = pytest.mark.slow  # full scale: the 145,116-key replica


def dsv4_slice(argv: list[str]) -> int:
    return dsv4(["slice", *argv])


# What the canary writes (measured from the plan): 2 layers + embed/head (3.7 GB of the total) + MTP.
CANARY_BYTES = 5_839_011_696


def test_two_layers_eight_experts_of_v4_pro(release_replica):
    ck = Checkpoint.open(release_replica)
    plan = plan_slice(ck, 2, 8)
    assert plan.layers == (0, 4)  # hash-routed HCA and top-k CSA (with the indexer)
    cfg = plan.config
    assert (cfg["num_hidden_layers"], cfg["n_routed_experts"], cfg["num_hash_layers"]) == (2, 8, 1)
    assert cfg["compress_ratios"] == [128, 4, 0] and cfg["num_nextn_predict_layers"] == 1
    want = [(t.key, t.dtype, t.shape) for t in release_tensors(cfg)]
    got = [(t.key, t.dtype, t.shape) for sh in plan.output.shards for t in sh.tensors]
    assert got == want
    assert plan.output.total_bytes == CANARY_BYTES  # 5.84 GB (5.44 GiB) of the release's 805 GiB
    assert plan.output.total_bytes < ck.total_bytes / 100
    # the replica's tid2eid is holes (all zeros): every row becomes the distinct experts 0..5
    (remapped,) = plan.remapped.values()
    assert remapped.shape == (129_280, 6) and remapped[0].tolist() == [0, 1, 2, 3, 4, 5]


def test_dry_run_on_the_replica_validates_and_prints_the_plan(release_replica, tmp_path, capsys):
    assert dsv4_slice([str(release_replica), str(tmp_path / "s"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "layers.0 <- layers.0 (hash, hca)" in out and "layers.1 <- layers.4 (csa, topk)" in out
    assert "262 tensors" in out and "5.84 GB" in out
    assert not (tmp_path / "s").exists()
    assert json.loads((release_replica / "config.json").read_text())["num_hidden_layers"] == 61
