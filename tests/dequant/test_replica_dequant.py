"""dsv4 dequant planned on the full release layout (the sparse replica): formats, counts, output size,
and the disk check that must refuse before anything is written."""

from __future__ import annotations

import math

import pytest

from pipeline.checkpoint import Checkpoint
from pipeline.cli import main as dsv4
from pipeline.dequant import plan_dequant
from pipeline.release_layout import FP8, MXFP4, PLAIN, release_weights

pytestmark = pytest.mark.slow  # full scale: the 145,116-key replica


def test_full_scale_plan_from_the_sparse_replica(release_replica):
    """Plans all 145,116 real tensors from headers: formats, counts and the BF16 output size."""
    ck = Checkpoint.open(release_replica)
    plan = plan_dequant(ck)
    counts = plan.counts()
    weights = release_weights(ck.config)
    assert counts[FP8] == sum(w.fmt == FP8 for w in weights) == 528
    assert counts[MXFP4] == sum(w.fmt == MXFP4 for w in weights) == 71_424
    bf16_bytes = sum(2 * math.prod(w.shape) for w in weights if w.fmt != PLAIN)
    plain_bytes = sum(
        i.nbytes for k, i in ck.tensors.items() if plan.sources.get(k, None) and plan.sources[k].fmt == PLAIN
    )
    assert plan.output.tensor_bytes == bf16_bytes + plain_bytes
    assert 3.1e12 < plan.output.tensor_bytes < 3.3e12  # V4 Pro is ~1.6T parameters: 3.2 TB in BF16
    assert len(plan.output.weight_map) == len(ck.tensors) - counts[FP8] - counts[MXFP4]


def test_full_scale_disk_check_refuses_before_writing(release_replica, tmp_path, capsys, monkeypatch):
    """The replica validates; its 3.2 TB BF16 output cannot fit on 1 TB: refused up front, nothing written."""
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(2 * 10**12, 10**12, 10**12))
    code = dsv4(["dequant", str(release_replica), str(tmp_path / "out"), "--quiet"])
    assert code == 2 and "not enough free disk space" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
