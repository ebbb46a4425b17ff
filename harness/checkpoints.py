"""The tiny checkpoints the checkpoint tests mutate (the micro model, in the release layout or in BF16),
and a content digest of a checkpoint directory that is cheap on sparse files."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from harness.tiny import build_tiny_release

_CHUNK = 1 << 16


def build_tiny_checkpoint(out_dir: str | os.PathLike, layout: str = "release", seed: int = 0) -> Path:
    """The micro tiny model (harness/tiny.py) as a multi-shard checkpoint with index and config.json.

    layout="release": FP8 block weights with UE8M0 .scale and MXFP4 experts, as the release ships them;
    layout="bf16": the same model through `dsv4 dequant` (native names, no scales).
    """
    if layout not in ("release", "bf16"):
        raise ValueError(f"layout must be 'release' or 'bf16'; got {layout!r}")
    if layout == "release":
        return build_tiny_release(out_dir, "micro", seed)
    from pipeline.dequant import dequantize_checkpoint

    with tempfile.TemporaryDirectory(prefix="dsv4-tiny-") as tmp:
        src = build_tiny_release(Path(tmp) / "release", "micro", seed)
        return dequantize_checkpoint(src, out_dir, progress=False, overwrite=True).out_dir


# Files the one-GPU path (convert RELEASE --amax) and the BF16 path (convert EXPORT) write differently
# by design: convert's report (how the output was made), the journal (it fingerprints its own inputs),
# and the export's own files that convert copies (the quantize run's report, transformers' generation
# config), which the release path has no export to copy from. Every other file must be the same bytes.
PATH_SPECIFIC_FILES = frozenset(
    {"dsv4-convert-report.json", ".dsv4-progress.json", "dsv4-quantize-report.json", "generation_config.json"}
)


def differing_files(
    a: str | os.PathLike, b: str | os.PathLike, ignore: frozenset[str] = frozenset()
) -> set[str]:
    """Relative names of the files that are in only one of ``a`` and ``b``, or differ, less ``ignore``."""
    da, db = tree_digest(a), tree_digest(b)
    return {k for k in da.keys() | db.keys() if da.get(k) != db.get(k)} - ignore


def tree_digest(path: str | os.PathLike) -> dict[str, str]:
    """{relative file name: sha256 of (size, data extents)} for every file under ``path``.

    Holes read as zeros, so hashing each data extent with its offset (found with SEEK_DATA/SEEK_HOLE)
    identifies the content of a sparse file as surely as hashing all of it, at the cost of its data
    only: the 805 GiB replica digests in well under a second.
    """
    root = Path(path)
    out: dict[str, str] = {}
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h = hashlib.sha256()
        size = p.stat().st_size
        h.update(size.to_bytes(8, "little"))
        with p.open("rb") as f:
            fd, pos = f.fileno(), 0
            while pos < size:
                try:
                    start = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError:
                    break
                end = os.lseek(fd, start, os.SEEK_HOLE)
                # Chunks aligned to absolute offsets, all-zero ones skipped: zeros written explicitly hash
                # like a hole, so the digest depends on the bytes only, not on how the file is laid out.
                start -= start % _CHUNK
                f.seek(start)
                for off in range(start, end, _CHUNK):
                    chunk = f.read(min(_CHUNK, end - off))
                    if chunk.count(0) != len(chunk):
                        h.update(off.to_bytes(8, "little") + chunk)
                pos = end
        out[str(p.relative_to(root))] = h.hexdigest()
    return out
