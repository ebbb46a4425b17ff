"""The digest the journal records for each finished shard, computed while the shard is written, and
computed again from the file when ``--resume`` checks a kept shard.

One sha256 over a whole shard runs on one core at about 1 GB/s (hashlib), slower than the lent GPU
machines' disks take a shard: profiled on 16 cores, `dsv4 convert`'s writer spent a fifth of its run
waiting for its one hash thread (docs/benchmarks.md). So the digest is a hash list: the sha256 of the
concatenated sha256 digests of the file's consecutive :data:`PIECE_BYTES` pieces (the last one
shorter), which threads compute side by side (hashlib releases the GIL while it hashes a buffer).
Any changed byte changes its piece's digest and so the shard's, as with one sha256; only the rule
differs, so the journal names it (:data:`FIELD`).

A journal written before this rule holds a plain ``sha256`` per shard; :func:`matches` still checks
those, so an interrupted run resumes across the upgrade.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

PIECE_BYTES = 32 * 1024**2  # large next to hashlib's per-call cost, small enough to spread over threads
FIELD = "sha256_pieces"  # the journal's name for this digest of a shard
LEGACY_FIELD = "sha256"  # a journal from before: one sha256 of the whole file


def default_threads() -> int:
    """Hash threads: 4 hash about 4 GB/s, more than a disk writes; never more than the cores."""
    from pipeline.step_options import available_cores

    return min(4, available_cores())


def _sha256_of(parts: list[memoryview]) -> bytes:
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.digest()


def _combine(piece_digests: list[bytes]) -> str:
    return hashlib.sha256(b"".join(piece_digests)).hexdigest()


class PieceHasher:
    """The digest of the bytes given to :meth:`update`, in order, hashed piece by piece on threads.

    A piece keeps references to the buffers it spans until it is hashed, and at most ``ahead`` pieces
    wait for a thread (:meth:`update` then waits for the oldest): the memory it holds is bounded by
    about ``ahead * PIECE_BYTES`` beyond what the writer holds anyway."""

    def __init__(self, threads: int | None = None, ahead: int = 8) -> None:
        self._pool = ThreadPoolExecutor(threads or default_threads(), thread_name_prefix="shard-digest")
        self._ahead = max(1, ahead)
        self._pending: deque[Future] = deque()
        self._digests: list[bytes] = []
        self._parts: list[memoryview] = []
        self._filled = 0

    def update(self, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            take = min(len(view), PIECE_BYTES - self._filled)
            self._parts.append(view[:take])
            self._filled += take
            view = view[take:]
            if self._filled == PIECE_BYTES:
                self._submit()

    def _submit(self) -> None:
        parts, self._parts, self._filled = self._parts, [], 0
        if len(self._pending) >= self._ahead:
            self._digests.append(self._pending.popleft().result())
        self._pending.append(self._pool.submit(_sha256_of, parts))

    def hexdigest(self) -> str:
        if self._parts or not (self._digests or self._pending):  # the last, shorter piece (or an empty file)
            self._submit()
        while self._pending:
            self._digests.append(self._pending.popleft().result())
        self.close()
        return _combine(self._digests)

    def close(self) -> None:
        """Stop the threads (waiting for none of the queued pieces: after an error nobody wants them)."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def _piece_of(path: Path, index: int) -> bytes:
    with path.open("rb", buffering=0) as f:
        f.seek(index * PIECE_BYTES)
        data = f.read(PIECE_BYTES)
    return _sha256_of([memoryview(data)])


def file_digest(path: str | os.PathLike, threads: int | None = None) -> str:
    """The :class:`PieceHasher` digest of a file's bytes, its pieces read and hashed on threads."""
    path = Path(path)
    pieces = max(1, -(-path.stat().st_size // PIECE_BYTES))
    with ThreadPoolExecutor(threads or default_threads(), thread_name_prefix="file-digest") as pool:
        return _combine(list(pool.map(lambda i: _piece_of(path, i), range(pieces))))


def sha256_file(path: str | os.PathLike) -> str:
    """One sha256 of a whole file (what journals before the hash list recorded)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def record(size: int, digest: str) -> dict:
    """A finished shard's journal record."""
    return {"size": size, FIELD: digest}


def matches(path: str | os.PathLike, rec: dict) -> bool:
    """Whether the file's bytes are those ``rec`` (a journal record) was made from: by the hash list, or,
    for a journal written before it, by one sha256 of the file."""
    if FIELD in rec:
        return file_digest(path) == rec[FIELD]
    if LEGACY_FIELD in rec:
        return sha256_file(path) == rec[LEGACY_FIELD]
    return False
