"""The writer's planning and disk check on the full 805 GiB release layout (headers only)."""

from __future__ import annotations

import shutil
from collections import namedtuple

import pytest

from pipeline.checkpoint import Checkpoint
from pipeline.checkpoint.writer import PlannedTensor, per_tensor, plan_shards, write_checkpoint
from pipeline.errors import DsV4Error

pytestmark = pytest.mark.slow  # full scale: the 145,116-key replica


def test_replica_sized_plan_is_refused_for_disk_before_any_producing(tmp_path, release_replica, monkeypatch):
    """Planning the 805 GiB layout and the disk check run on headers only, in seconds."""
    ck = Checkpoint.open(release_replica)
    plan = plan_shards(PlannedTensor(k, i.dtype, i.shape) for k, i in ck.tensors.items())
    assert plan.tensor_bytes == ck.total_bytes == 864_704_792_696
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(2**41, 2**40, 500 * 2**30))

    def never(pt):
        raise AssertionError("nothing may be produced before the disk check")

    with pytest.raises(
        DsV4Error, match=r"needs 805\.\d\d GiB more \(\d+ shard\(s\) to write\), 500\.00 GiB is free"
    ):
        write_checkpoint(plan, tmp_path / "out", per_tensor(never), inputs=[release_replica])
