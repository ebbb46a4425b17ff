"""A header-true, sparse replica of the DeepSeek V4 Pro release checkpoint (64 shards, 805 GiB).

From ``reference/deepseek-v4-pro/weights.tsv.gz`` (key, dtype, shape, shard) and its config.json this
writes the 64 shards with real safetensors headers (all 145,116 keys, dtypes, shapes) and data regions
left as holes (the file is truncated up to its size), plus the index and config.json. Validation,
planning and disk estimates then run on the real layout in seconds, on a few MiB of disk.

Holes read as zero bytes: UE8M0 byte 0 is 2^-127, positive and finite, so the replica's scales pass.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

from pipeline.checkpoint.reader import CONFIG_NAME, INDEX_NAME
from pipeline.checkpoint.writer import OutputPlan, PlannedTensor, ShardPlan

REPO_ROOT = Path(__file__).resolve().parent.parent
# ../shared/reference next to the repo; DSV4_REFERENCE_DIR points elsewhere (e.g. an installed harness).
REFERENCE_DIR = Path(
    os.environ.get("DSV4_REFERENCE_DIR") or REPO_ROOT.parent / "shared" / "reference" / "deepseek-v4-pro"
)
WEIGHTS_TSV = REFERENCE_DIR / "weights.tsv.gz"
REFERENCE_CONFIG = REFERENCE_DIR / "config.json"
RELEASE_TENSORS = 145_116
RELEASE_SHARDS = 64


def reference_missing() -> str | None:
    """None if the reference table and config are there, else a sentence saying what is missing."""
    absent = [str(p) for p in (WEIGHTS_TSV, REFERENCE_CONFIG) if not p.is_file()]
    return f"reference data not found: {', '.join(absent)}" if absent else None


def _shape(text: str) -> tuple[int, ...]:
    # "129280x7168" -> (129280, 7168); an empty field would be a scalar (the table has none).
    return tuple(int(d) for d in text.split("x")) if text.strip() else ()


def load_weights_table(path: Path = WEIGHTS_TSV) -> list[tuple[str, str, tuple[int, ...], str]]:
    """Rows (key, safetensors dtype, shape, shard file name) of the reference table."""
    rows = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        if header != ["key", "dtype", "shape", "shard"]:
            raise ValueError(f"{path}: unexpected columns {header}")
        for line in f:
            key, dtype, shape, shard = line.rstrip("\n").split("\t")
            rows.append((key, dtype, _shape(shape), shard))
    return rows


def release_plan(path: Path = WEIGHTS_TSV) -> OutputPlan:
    """The release's shards as an OutputPlan (tensors in table order within each shard)."""
    by_shard: dict[str, list[PlannedTensor]] = {}
    for key, dtype, shape, shard in load_weights_table(path):
        by_shard.setdefault(shard, []).append(PlannedTensor(key, dtype, shape))
    return OutputPlan(tuple(ShardPlan(name, tuple(ts)) for name, ts in sorted(by_shard.items())))


def write_sparse(plan: OutputPlan, out_dir: Path, config: Path | dict | None = None) -> Path:
    """Write ``plan``'s shards as real headers followed by holes, its index, and config.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for sh in plan.shards:
        with (out_dir / sh.name).open("wb") as f:
            f.write(sh.header_bytes)
            f.truncate(sh.file_size)
    (out_dir / INDEX_NAME).write_bytes(plan.index_bytes)
    if isinstance(config, dict):
        (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    elif config is not None:
        shutil.copyfile(config, out_dir / CONFIG_NAME)
    return out_dir


def build_replica(
    out_dir: str | os.PathLike, *, tsv: Path = WEIGHTS_TSV, config: Path = REFERENCE_CONFIG
) -> Path:
    """Build the sparse replica of the release into ``out_dir``; returns it."""
    return write_sparse(release_plan(tsv), Path(out_dir), config)


def sparse_copy(src: Path, dst: Path) -> None:
    """Copy a file keeping its holes (SEEK_DATA/SEEK_HOLE): only the data extents are read and written."""
    size = src.stat().st_size
    with src.open("rb") as fi, dst.open("wb") as fo:
        fd = fi.fileno()
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole remains
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            fi.seek(start)
            fo.seek(start)
            remaining = end - start
            while remaining:
                chunk = fi.read(min(remaining, 1 << 24))
                fo.write(chunk)
                remaining -= len(chunk)
            pos = end
        fo.truncate(size)


def clone_replica(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """An independent copy of a sparse checkpoint (every file copied sparsely, no hard links), cheap to
    mutate: the source stays as it was whatever the copy's test does."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for p in sorted(src.iterdir()):
        if p.is_file():
            sparse_copy(p, dst / p.name)
    return dst
