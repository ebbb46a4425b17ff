"""Planned, streaming, crash-safe writing of sharded safetensors checkpoints.

The output is planned up front from headers (:class:`OutputPlan`: shards, each an ordered list of
(key, dtype, shape)), so every size, the disk need and the final index are known before any data is
produced. :func:`write_checkpoint` then writes one shard at a time, tensor by tensor, as a producer
yields them:

* each shard goes to ``.<name>.partial`` in the output dir, is flushed, fsynced and renamed;
* a journal (``.dsv4-progress.json``) records each finished shard with its size and sha256, hashed
  while the bytes are written (no re-read), and the digest of the plan it belongs to;
* ``model.safetensors.index.json`` is written last (temp + rename), then the journal is marked complete.

A killed run leaves at most a ``.partial`` file and a journal, never an index or a final-named shard
that is incomplete. ``resume=True`` re-hashes the shards the journal lists (a disk-bound read, far
cheaper than producing them again), keeps those that match and redoes the rest; the header bytes come
from the plan alone, so a resumed run's bytes equal an uninterrupted run's.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import queue
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from pipeline.errors import DsV4Error

from . import dtypes
from .reader import INDEX_NAME

JOURNAL_NAME = ".dsv4-progress.json"
PARTIAL_SUFFIX = ".partial"
DEFAULT_METADATA = {"format": "pt"}
DEFAULT_SHARD_TEMPLATE = "model-{index:05d}-of-{count:05d}.safetensors"
GIB = 1024**3


@dataclass(frozen=True)
class PlannedTensor:
    key: str
    dtype: str  # safetensors string, e.g. "U8"
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        dtypes.lookup(self.dtype, where=f"planned key {self.key}")
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtypes.itemsize(self.dtype)


@dataclass(frozen=True)
class ShardPlan:
    name: str
    tensors: tuple[PlannedTensor, ...]
    metadata: dict[str, str] | None = field(default_factory=lambda: dict(DEFAULT_METADATA))

    @cached_property
    def header_bytes(self) -> bytes:
        """8-byte length + JSON header, padded with spaces to a multiple of 8 (as safetensors does).

        Deterministic: entries in plan order, compact separators, so the same plan gives the same bytes.
        """
        header: dict = {}
        if self.metadata is not None:
            header["__metadata__"] = dict(self.metadata)
        pos = 0
        for t in self.tensors:
            header[t.key] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
            pos += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        return len(raw).to_bytes(8, "little") + raw

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def file_size(self) -> int:
        return len(self.header_bytes) + self.data_bytes


@dataclass(frozen=True)
class OutputPlan:
    shards: tuple[ShardPlan, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "shards", tuple(self.shards))
        names: set[str] = set()
        seen: dict[str, str] = {}
        for sh in self.shards:
            if sh.name in names or "/" in sh.name or sh.name.startswith(".") or sh.name == INDEX_NAME:
                raise DsV4Error(f"plan: bad or repeated shard name {sh.name!r}")
            names.add(sh.name)
            for t in sh.tensors:
                if t.key in seen:
                    raise DsV4Error(f"plan: key {t.key} planned in both {seen[t.key]} and {sh.name}")
                seen[t.key] = sh.name

    @property
    def total_bytes(self) -> int:
        """Bytes of all shard files (headers included)."""
        return sum(sh.file_size for sh in self.shards)

    @property
    def tensor_bytes(self) -> int:
        return sum(sh.data_bytes for sh in self.shards)

    @property
    def weight_map(self) -> dict[str, str]:
        return {t.key: sh.name for sh in self.shards for t in sh.tensors}

    @cached_property
    def index_bytes(self) -> bytes:
        wm = dict(sorted(self.weight_map.items()))
        return (
            json.dumps({"metadata": {"total_size": self.tensor_bytes}, "weight_map": wm}, indent=2) + "\n"
        ).encode()

    @cached_property
    def digest(self) -> str:
        h = hashlib.sha256()
        for sh in self.shards:
            h.update(sh.name.encode() + b"\0" + sh.header_bytes)
        return h.hexdigest()


def plan_shards(
    tensors: Iterable[PlannedTensor],
    *,
    max_shard_bytes: int = 5 * GIB,
    name_template: str = DEFAULT_SHARD_TEMPLATE,
    metadata: dict[str, str] | None = None,
) -> OutputPlan:
    """Split tensors, in the given order, into shards of at most ``max_shard_bytes`` of data each
    (a single larger tensor gets a shard of its own). Names follow ``name_template`` (index from 1)."""
    groups: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + t.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    groups = [g for g in groups if g] or [[]]
    md = dict(DEFAULT_METADATA) if metadata is None else metadata
    n = len(groups)
    return OutputPlan(
        tuple(
            ShardPlan(name_template.format(index=i + 1, count=n), tuple(g), md) for i, g in enumerate(groups)
        )
    )


# A producer gets one ShardPlan and yields (key, tensor) for its tensors, in plan order.
Producer = Callable[[ShardPlan], Iterable[tuple[str, torch.Tensor]]]


def per_tensor(fn: Callable[[PlannedTensor], torch.Tensor]) -> Producer:
    """A Producer from a function that makes one planned tensor at a time."""

    def produce(shard: ShardPlan) -> Iterator[tuple[str, torch.Tensor]]:
        for t in shard.tensors:
            yield t.key, fn(t)

    return produce


@dataclass
class WriteResult:
    out_dir: Path
    written: list[str]
    skipped: list[str]  # finished shards kept on resume
    total_bytes: int


def _write_all(fd: int, data: memoryview | bytes) -> None:
    """Write every byte of ``data`` to ``fd``. The one place the writer writes shard bytes (tests
    patch it to simulate a full disk)."""
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


def _io_error(path: Path, err: OSError, key: str | None = None) -> DsV4Error:
    where = f"{path}: key {key}" if key else str(path)
    if err.errno == errno.ENOSPC:
        return DsV4Error(f"{where}: no space left on device while writing; the partial file was removed")
    return DsV4Error(f"{where}: {err.strerror or err}")


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
        tmp.unlink(missing_ok=True)
        raise _io_error(path, err) from err


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
        tmp.unlink(missing_ok=True)
        raise _io_error(dst if err.filename != str(src) else src, err) from err
    return dst


def _is_within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _load_journal(out: Path) -> dict | None:
    path = out / JOURNAL_NAME
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("finished"), dict):
            raise ValueError("no 'finished' object")
        return data
    except (OSError, ValueError) as err:
        raise DsV4Error(f"{path}: unreadable progress journal ({err}); rerun with overwrite") from None


def write_checkpoint(
    plan: OutputPlan,
    out_dir: str | os.PathLike,
    produce: Producer,
    *,
    inputs: Iterable[str | os.PathLike] = (),
    extra_files: Iterable[str | os.PathLike] = (),
    resume: bool = False,
    overwrite: bool = False,
    verify: str = "sha256",
    progress: Callable[[str], None] | None = None,
) -> WriteResult:
    """Write ``plan`` into ``out_dir``, shard by shard, with tensors from ``produce``.

    inputs: the input checkpoint dir(s); the output may not be one of them, inside one, or contain one.
    extra_files: non-tensor files (config.json, ...) copied in (temp + rename) before the index.
    resume: keep the shards a previous run of the same plan finished (checked by ``verify``: "sha256"
        re-hashes them, "size" trusts size alone), redo the rest. overwrite: remove the previous
        output's shards, index, journal and partial files first.
    Refuses, before writing anything, an output inside an input, a non-empty output without resume or
    overwrite, a journal from a different plan, and an output the free disk space cannot hold.
    """
    if verify not in ("sha256", "size"):
        raise ValueError(f"verify must be 'sha256' or 'size'; got {verify!r}")
    say = progress or (lambda msg: None)
    out = Path(out_dir).resolve()
    for inp in inputs:
        inp_r = Path(inp).resolve()
        if _is_within(out, inp_r):
            raise DsV4Error(
                f"{out}: refusing to write the output inside the input {inp_r}; choose another directory"
            )
        if _is_within(inp_r, out):
            raise DsV4Error(
                f"{out}: refusing to write the output into a directory that contains the input {inp_r}"
            )
    if out.exists() and not out.is_dir():
        raise DsV4Error(f"{out}: exists and is not a directory")
    extras = [Path(e) for e in extra_files]
    planned = {sh.name: sh for sh in plan.shards}

    entries = sorted(out.iterdir()) if out.exists() else []
    partials = [p for p in entries if p.name.startswith(".") and p.name.endswith(PARTIAL_SUFFIX)]
    to_remove: list[Path] = list(partials)
    finished: dict[str, dict] = {}
    if entries and not (resume or overwrite):
        shown = ", ".join(p.name for p in entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise DsV4Error(f"{out}: output directory is not empty ({shown}); pass resume or overwrite")
    if entries and overwrite:
        ours = {INDEX_NAME, JOURNAL_NAME, *(e.name for e in extras)}
        to_remove += [
            p for p in entries if p.is_file() and (p.name in ours or p.name.endswith(".safetensors"))
        ]
    elif entries and resume:
        journal = _load_journal(out)
        others = [p for p in entries if p not in partials]
        if journal is None and others:
            raise DsV4Error(
                f"{out}: nothing to resume (no {JOURNAL_NAME}) but the directory is not empty "
                f"({', '.join(p.name for p in others[:3])}); pass overwrite to start again"
            )
        if journal is not None and journal.get("plan") != plan.digest:
            raise DsV4Error(
                f"{out / JOURNAL_NAME}: the unfinished output was planned differently (other shards, keys, "
                "dtypes or shapes); pass overwrite to start again"
            )
        for name, rec in (journal or {}).get("finished", {}).items():
            path = out / name
            sh = planned.get(name)
            if sh is None or not path.is_file() or not path.stat().st_size == sh.file_size == rec.get("size"):
                continue
            if verify == "sha256" and _sha256_file(path) != rec.get("sha256"):
                say(f"{name}: does not match the journal; rewriting it")
                continue
            finished[name] = rec

    # Disk space: what remains to be written vs what is free (files about to be removed count as free).
    todo = [sh for sh in plan.shards if sh.name not in finished]
    need = sum(sh.file_size for sh in todo) + len(plan.index_bytes) + sum(e.stat().st_size for e in extras)
    probe = out if out.exists() else next(p for p in out.parents if p.exists())
    free = shutil.disk_usage(probe).free + sum(p.stat().st_size for p in set(to_remove) if p.exists())
    if need > free:
        raise DsV4Error(
            f"{out}: not enough free disk space: the output needs {need / GIB:.2f} GiB more "
            f"({len(todo)} shard(s) to write), {free / GIB:.2f} GiB is free"
        )

    for p in set(to_remove):
        p.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    journal = {"format": 1, "plan": plan.digest, "complete": False, "finished": dict(finished)}
    write_json_atomic(out / JOURNAL_NAME, journal)

    written: list[str] = []
    for i, sh in enumerate(plan.shards):
        if sh.name in finished:
            say(f"[{i + 1}/{len(plan.shards)}] {sh.name}: finished earlier, kept")
            continue
        say(f"[{i + 1}/{len(plan.shards)}] {sh.name}: writing {sh.file_size / GIB:.2f} GiB")
        size, sha = _write_shard(sh, out, produce)
        done = {**journal["finished"], sh.name: {"size": size, "sha256": sha}}
        # in plan order, however the shards came to be finished: a resumed run's journal equals a whole run's
        journal["finished"] = {s.name: done[s.name] for s in plan.shards if s.name in done}
        write_json_atomic(out / JOURNAL_NAME, journal)
        written.append(sh.name)
    for e in extras:
        copy_file_atomic(e, out)
    write_bytes_atomic(out / INDEX_NAME, plan.index_bytes)
    journal["complete"] = True
    write_json_atomic(out / JOURNAL_NAME, journal)
    return WriteResult(out, written, sorted(finished), plan.total_bytes)


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


class _BackgroundSha256:
    """sha256 of the bytes a shard is written with, computed on a second thread.

    hashlib and os.write both release the GIL, so hashing tensor k while tensor k+1 is being written
    takes the hash (about a quarter of the writer's time on a 2-core machine) off the critical path.
    The queue is bounded, so at most a few tensors wait for the hasher; each buffer stays alive
    through the reference the queue holds.
    """

    def __init__(self, depth: int = 4) -> None:
        self._hash = hashlib.sha256()
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._run, name="shard-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (data := self._queue.get()) is not None:
            self._hash.update(data)

    def update(self, data: memoryview | bytes) -> None:
        self._queue.put(data)

    def hexdigest(self) -> str:
        self.close()
        return self._hash.hexdigest()

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()


def _write_shard(sh: ShardPlan, out: Path, produce: Producer) -> tuple[int, str]:
    final = out / sh.name
    tmp = out / f".{sh.name}{PARTIAL_SUFFIX}"
    h = _BackgroundSha256()
    size = 0
    key: str | None = None
    items = iter(produce(sh))
    producing = False  # an OSError raised by the producer (reading its input) is its own, not a write error
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, sh.header_bytes)
            h.update(sh.header_bytes)
            size += len(sh.header_bytes)
            for pt in sh.tensors:
                key = pt.key
                try:
                    producing = True
                    got_key, t = next(items)
                    producing = False
                except StopIteration:
                    raise DsV4Error(
                        f"{final}: key {pt.key}: the producer stopped before yielding it"
                    ) from None
                _check_produced(final, pt, got_key, t)
                data = _tensor_bytes(t)
                _write_all(fd, data)
                h.update(data)
                size += len(data)
            key = None
            producing = True
            extra = next(items, None)
            producing = False
            if extra is not None:
                raise DsV4Error(
                    f"{final}: key {extra[0]}: the producer yielded more tensors than the shard plans"
                )
            os.fsync(fd)
        finally:
            os.close(fd)
        if size != sh.file_size:  # pragma: no cover - guarded by the per-tensor checks
            raise DsV4Error(f"{final}: wrote {size} bytes, planned {sh.file_size}")
        os.replace(tmp, final)
        _fsync_dir(out)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if producing:
            raise
        raise _io_error(final, err, key) from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        h.close()
        close = getattr(items, "close", None)
        if close is not None:
            close()
    return size, h.hexdigest()


def _check_produced(final: Path, pt: PlannedTensor, got_key: str, t: object) -> None:
    if got_key != pt.key:
        raise DsV4Error(f"{final}: key {pt.key}: the producer yielded {got_key!r} in its place")
    if not isinstance(t, torch.Tensor):
        raise DsV4Error(f"{final}: key {pt.key}: the producer yielded a {type(t).__name__}, not a tensor")
    want = dtypes.to_torch(pt.dtype)
    if t.dtype != want:
        raise DsV4Error(f"{final}: key {pt.key}: produced dtype {t.dtype}, planned {pt.dtype} ({want})")
    if tuple(t.shape) != pt.shape:
        raise DsV4Error(f"{final}: key {pt.key}: produced shape {tuple(t.shape)}, planned {pt.shape}")
