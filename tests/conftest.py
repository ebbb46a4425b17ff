"""Checkpoint fixtures: the full-scale sparse replica of the release (built once per session) and
the micro tiny model (harness/tiny.py) in the release layout and in BF16, each with a cheap way to get
a copy a test may mutate."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from harness.checkpoints import build_tiny_checkpoint
from harness.replica import build_replica, clone_replica, reference_missing


@pytest.fixture(scope="session")
def release_replica(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 64-shard, 145,116-key replica of the release: real headers, holes for data. Do not mutate it;
    use ``replica_copy``. Skips, saying why, when ../shared/reference is not there."""
    why = reference_missing()
    if why:
        pytest.skip(f"{why} (the sparse replica is built from ../shared/reference next to the repo)")
    return build_replica(tmp_path_factory.mktemp("release-replica"))


@pytest.fixture
def replica_copy(release_replica: Path, tmp_path: Path) -> Callable[[], Path]:
    """A function returning a fresh, independent sparse copy of the replica (a few MiB, under a second)."""
    count = iter(range(1_000_000))
    return lambda: clone_replica(release_replica, tmp_path / f"replica-copy-{next(count)}")


@pytest.fixture(scope="session")
def _tiny_release_master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-release"), "release")


@pytest.fixture(scope="session")
def _tiny_bf16_master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-bf16"), "bf16")


@pytest.fixture
def tiny_release(_tiny_release_master: Path, tmp_path: Path) -> Path:
    """A private copy of the micro model in the release layout (FP8 attention, MXFP4 experts), sharded
    as harness/tiny.py shards it: derive shard names, counts and shapes from its index and config.json."""
    return clone_replica(_tiny_release_master, tmp_path / "tiny-release")


@pytest.fixture
def tiny_bf16(_tiny_bf16_master: Path, tmp_path: Path) -> Path:
    """A private copy of the same checkpoint through `dsv4 dequant`: BF16, native names, no scales."""
    return clone_replica(_tiny_bf16_master, tmp_path / "tiny-bf16")
