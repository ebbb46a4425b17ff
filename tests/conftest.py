"""Shared fixtures. Checkpoint fixtures: the full-scale sparse replica of the release (built once per
session) and the micro tiny model (harness/tiny.py) in the release layout and in BF16, each with a cheap
way to get a copy a test may mutate. Then the tiny tier's fixtures (tests marked ``tiny``): the micro
release checkpoint, its BF16 copy made by `dsv4 dequant`, and both loaded into transformers
(session-scoped; tests only read them)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from harness.checkpoints import build_tiny_checkpoint
from harness.exports import build_synthetic_export
from harness.markers import require_reference
from harness.replica import build_replica, clone_replica, reference_missing
from harness.tiny import build_tiny_release
from pipeline.convert import convert_checkpoint
from pipeline.dequant import dequantize_checkpoint


@pytest.fixture(scope="session")
def release_replica(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 64-shard, 145,116-key replica of the release: real headers, holes for data. Do not mutate it;
    use ``replica_copy``. Skips, saying why, when ../shared/reference is not there."""
    if reference_missing():
        require_reference("the sparse replica of the release")  # CI: fails, never skips
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


@pytest.fixture(scope="session")
def exports(_tiny_bf16_master: Path, tmp_path_factory: pytest.TempPathFactory):
    """(recipe, dialect, w13_global) -> a synthetic ModelOpt export of the micro model (harness/exports.py),
    built once per session on first use. Do not mutate."""
    root = tmp_path_factory.mktemp("exports")
    cache: dict[tuple[str, str, str], Path] = {}

    def get(recipe: str = "experts", dialect: str = "X", w13: str = "shared") -> Path:
        key = (recipe, dialect, w13)
        if key not in cache:
            cache[key] = build_synthetic_export(
                _tiny_bf16_master, root / "-".join(key), recipe=recipe, dialect=dialect, w13_global=w13
            )
        return cache[key]

    return get


@pytest.fixture(scope="session")
def converted(exports, _tiny_release_master: Path, tmp_path_factory: pytest.TempPathFactory):
    """(recipe, dialect, w13_global, graft) -> the ConvertResult of `dsv4 convert` on ``exports(...)``
    (graft: --graft-from the micro release), built once per session on first use. Do not mutate."""
    root = tmp_path_factory.mktemp("converted")
    cache: dict[tuple, object] = {}

    def get(recipe: str = "experts", dialect: str = "X", w13: str = "shared", graft: bool = False):
        key = (recipe, dialect, w13, graft)
        if key not in cache:
            cache[key] = convert_checkpoint(
                exports(recipe, dialect, w13),
                root / "-".join(map(str, key)),
                graft_from=_tiny_release_master if graft else None,
                progress=False,
            )
        return cache[key]

    return get


# ---- the tiny tier (tests marked `tiny`)


@pytest.fixture(autouse=True)
def _one_torch_thread(request: pytest.FixtureRequest):
    """Tests marked ``tiny``: tiny forwards are faster on one thread, and on a shared 2-core machine a
    contended OpenMP pool made them 5-10x slower (seen: the tier took 50 s instead of 7 s). Other tests
    keep torch's thread count."""
    if request.node.get_closest_marker("tiny") is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def micro_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_release(tmp_path_factory.mktemp("micro-release"), "micro", seed=0)


@pytest.fixture(scope="session")
def micro_bf16(micro_release: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The micro release through `dsv4 dequant` itself: the tier checks that transformers loads the
    step's real output."""
    out = tmp_path_factory.mktemp("micro-bf16") / "bf16"
    return dequantize_checkpoint(micro_release, out, progress=False).out_dir


@pytest.fixture(scope="session")
def micro_quantized_model(micro_release: Path):
    """(model, LoadReport) of the micro release loaded through transformers' FP8 dequantize path."""
    from harness.reference import load_reference

    return load_reference(micro_release, strict=False)


@pytest.fixture(scope="session")
def micro_bf16_model(micro_bf16: Path):
    """(model, LoadReport) of the BF16 dequantization of the micro release."""
    from harness.reference import load_reference

    return load_reference(micro_bf16, strict=False)


@pytest.fixture(scope="session")
def modelopt_exports(micro_bf16: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{recipe: real ModelOpt 0.47 export of the micro BF16 model} for both recipes (8 calibration
    samples of 32 tokens), made once by `dsv4 quantize`. Needs the quant env. Do not mutate."""
    from pipeline.quantize import QuantizeOptions, quantize_checkpoint

    root = tmp_path_factory.mktemp("modelopt-exports")
    out = {}
    for recipe in ("experts", "full"):
        quantize_checkpoint(
            micro_bf16, root / recipe, QuantizeOptions(recipe=recipe, calib_size=8, calib_seq=32)
        )
        out[recipe] = root / recipe
    return out
