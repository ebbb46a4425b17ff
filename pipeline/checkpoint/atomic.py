"""Small files written whole or not at all: temporary name in the same directory, fsync, rename, fsync
of the directory; and the one-line error an OSError of the writer becomes (path, what failed, what to do).

Shard bytes and small files alike are written by :func:`_write_all` (:mod:`.writer` calls it through this
module, so one ``monkeypatch`` of ``atomic._write_all`` reaches both, e.g. to simulate a full disk).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

from pipeline.errors import DsV4Error

PARTIAL_SUFFIX = ".partial"


def _write_all(fd: int, data: memoryview | bytes) -> None:
    """Write every byte of ``data`` to ``fd``. The one place the writer writes bytes, shards and small
    files alike (tests patch it here to simulate a full disk)."""
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# errno -> (what went wrong, what to do). Anything else: its strerror, and "fix the cause, --resume".
_OS_ERRORS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on device", "free space (or choose a DST with room)"),
    errno.EDQUOT: ("disk quota exceeded", "free space (or choose a DST with room)"),
    errno.EROFS: ("the file system is read-only", "choose a DST on a writable file system"),
    errno.EACCES: ("permission denied", "choose a DST you can write to"),
    errno.EPERM: ("operation not permitted", "choose a DST you can write to"),
}


def _discard(path: Path) -> OSError | None:
    """Remove a temporary file; a failure is returned, not raised, so that it never hides the error
    that made the cleanup necessary."""
    try:
        path.unlink(missing_ok=True)
    except OSError as err:
        return err
    return None


def _io_error(
    path: Path, err: OSError, key: str | None = None, doing: str = "writing", partial: Path | None = None
) -> DsV4Error:
    """One line for an OSError of the writer: the path (and key), what failed, why, and what to do."""
    where = f"{path}: key {key}" if key else str(path)
    reason, todo = _OS_ERRORS.get(err.errno or 0, (err.strerror or str(err), "fix the cause"))
    cleanup = ""
    if partial is not None:
        failed = _discard(partial)
        cleanup = (
            "; the partial file was removed"
            if failed is None
            else f"; the partial file {partial.name} could not be removed either ({failed.strerror})"
        )
    return DsV4Error(
        f"{where}: {reason} while {doing}{cleanup}; {todo} and rerun (--resume keeps finished shards)"
    )


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write a small file under a temporary name in its directory, fsync, rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{PARTIAL_SUFFIX}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as err:
        raise _io_error(path, err, partial=tmp) from err


def write_json_atomic(path: str | os.PathLike, obj: object) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2) + "\n").encode())


def copy_file_atomic(src: str | os.PathLike, out_dir: str | os.PathLike, name: str | None = None) -> Path:
    """Copy a non-tensor file (config.json, tokenizer files, ...) into ``out_dir`` via temp + rename."""
    src = Path(src)
    dst = Path(out_dir) / (name or src.name)
    tmp = dst.with_name(f".{dst.name}{PARTIAL_SUFFIX}")
    try:
        with src.open("rb") as fi, tmp.open("wb") as fo:
            shutil.copyfileobj(fi, fo, 1 << 20)
            fo.flush()
            os.fsync(fo.fileno())
        os.replace(tmp, dst)
        _fsync_dir(dst.parent)
    except OSError as err:
        reading = err.filename == str(src)
        where, doing = (src, "reading") if reading else (dst, "writing")
        raise _io_error(where, err, doing=doing, partial=tmp) from err
    return dst
