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

Output safety:

* one run per output folder: an exclusive ``flock`` on ``.dsv4.lock`` is held from before the journal is
  read to the end; a second run is refused, naming the holder;
* the journal lists every file the run writes, before writing the first: ``overwrite=True`` removes only
  those (a folder holding anything else is refused whole, so a slip never deletes a release);
* the journal fingerprints the input files (size, mtime, ctime, header hash): ``resume=True`` refuses
  to keep shards made from inputs that changed since, and the index is not written if they changed
  while being read;
* Ctrl-C removes the partial shard and raises :class:`pipeline.errors.Interrupted` saying how many shards
  are kept; an OSError while writing becomes one :class:`DsV4Error` naming the path, what failed and
  what to do, and a failing cleanup never hides it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import queue
import shlex
import shutil
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from pipeline.errors import DsV4Error, Interrupted

from . import dtypes
from .reader import INDEX_NAME

JOURNAL_NAME = ".dsv4-progress.json"
JOURNAL_FORMAT = 2  # 2: lists the files the run writes and fingerprints its inputs
LOCK_NAME = ".dsv4.lock"
ORIG_SUFFIX = ".orig"  # dsv4 fix-config / use-plugin back a file up as NAME.orig beside it
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


def _is_within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _shown(names: list[str], limit: int = 4) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# ---- one run per output folder -------------------------------------------------------------------


class _OutputLock:
    """An exclusive ``flock`` on ``DST/.dsv4.lock``, held from before the journal is read until the run
    ends, so two runs never write one folder (a second ``--resume`` would race on the journal).

    The file says who holds it (pid, host, command, start), for the second run's message. The lock is
    the kernel's, so a killed holder releases it with its last descriptor; the stale file it leaves is
    ours (``--resume``/``--overwrite`` accept it). At the end the file is unlinked while still locked;
    a run that opened it just before then finds, after its own flock, that the name now points elsewhere
    (or nowhere) and tries again, so two runs never hold locks on two different files.
    """

    def __init__(self, out: Path, path: Path | None = None, subject: Path | None = None) -> None:
        # out: the folder the lock file lives in (created if missing); path: the lock file (default
        # out/.dsv4.lock); subject: what the run writes, for the refusal (default out)
        self.out = out
        self.path = path or out / LOCK_NAME
        self.subject = subject or out
        self.created_dir = False
        self.fd: int | None = None

    def __enter__(self) -> _OutputLock:
        if not self.out.exists():
            try:
                self.out.mkdir(parents=True)
            except FileExistsError:
                pass
            except OSError as err:
                raise _io_error(self.out, err, doing="creating the output directory") from err
            else:
                self.created_dir = True
        for _ in range(10):
            fd = self._open_locked()
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                self._describe_holder(fd)
                return self
            os.close(fd)  # unlinked by the previous holder between our open and our flock
        raise DsV4Error(f"{self.path}: could not take the lock (the file keeps being replaced); rerun")

    def _open_locked(self) -> int:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            self._remove_created_dir()
            raise _io_error(self.path, err, doing="creating the lock file") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(fd)
            os.close(fd)
            raise DsV4Error(
                f"{self.subject}: another dsv4 run is writing this folder ({holder}); wait for it to end "
                "(or stop it), or choose another folder"
            ) from None
        return fd

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            info = json.loads(os.pread(fd, 1 << 16, 0))
            return f"pid {info['pid']} on {info['host']}, since {info['started']}: {info['command']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "its holder did not say who it is"

    @staticmethod
    def _describe_holder(fd: int) -> None:
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "?",
        }
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        except OSError:
            pass  # the lock holds without the note; the second run's message just cannot name us

    def _remove_created_dir(self) -> None:
        if self.created_dir:
            with contextlib.suppress(OSError):
                self.out.rmdir()  # only if empty: a refused run leaves no trace

    def __exit__(self, *exc: object) -> None:
        if self.fd is None:
            return
        _discard(self.path)
        os.close(self.fd)
        self.fd = None
        self._remove_created_dir()


def output_lock(out: Path, path: Path | None = None, subject: Path | None = None) -> _OutputLock:
    """The one-run-per-output lock, for a step that writes its output another way than
    :func:`write_checkpoint` (``dsv4 quantize``: ModelOpt writes a sibling ``.DST.partial``)."""
    return _OutputLock(out, path, subject)


# ---- what the output was made from ---------------------------------------------------------------


def _header_sha256(path: Path) -> str:
    with path.open("rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        return hashlib.sha256(head + f.read(min(n, 1 << 28))).hexdigest()


def fingerprint_inputs(inputs: Iterable[Path]) -> list[dict]:
    """size, mtime, ctime (and, for a shard, the sha256 of its header) of every file in the input dirs.

    Why not a content hash: proving the kept shards' input bytes would mean reading all of them again
    on --resume, as long as the run itself for a disk-bound step. What this catches: any write through
    the file system (it moves mtime and ctime), a restored mtime (os.utime cannot set ctime back), a
    copied-over or replaced file (new ctime, often new size), and any change to a header (keys, dtypes,
    shapes, offsets). What it cannot: bytes changed under the file system (bit rot, a raw block device
    write), which no stat sees. Hidden files (our journal and lock, when the input is itself a dsv4
    output) are not read by the steps and are left out.
    """
    prints = []
    for root in inputs:
        files = [root] if root.is_file() else sorted(p for p in root.iterdir() if not p.name.startswith("."))
        for path in files:
            try:
                st = path.stat()
            except OSError:
                continue  # a dangling link: no step reads it
            if not stat.S_ISREG(st.st_mode):
                continue
            rec = {
                "path": str(path),
                "size": st.st_size,
                "mtime_ns": st.st_mtime_ns,
                "ctime_ns": st.st_ctime_ns,
            }
            if path.name.endswith(".safetensors"):
                rec["header_sha256"] = _header_sha256(path)
            prints.append(rec)
    return prints


_FIELD_NAMES = {"size": "size", "mtime_ns": "mtime", "ctime_ns": "ctime", "header_sha256": "header"}


def _input_changes(before: list[dict], now: list[dict]) -> list[str]:
    """'PATH (what changed)' for each input file that differs between two fingerprints."""
    old = {r["path"]: r for r in before}
    new = {r["path"]: r for r in now}
    changes = []
    for path in sorted(old.keys() | new.keys()):
        a, b = old.get(path), new.get(path)
        if a is None or b is None:
            changes.append(f"{path} ({'is new' if a is None else 'is gone'})")
        elif diff := [name for f, name in _FIELD_NAMES.items() if a.get(f) != b.get(f)]:
            changes.append(f"{path} ({', '.join(diff)})")
    return changes


def _check_inputs_unchanged(journal_path: Path, journal: dict, now: list[dict]) -> None:
    """--resume keeps shards only if every input file is as it was when the run that wrote them began."""
    if not journal.get("finished"):
        return  # nothing kept, nothing to mix: the run starts over from these inputs
    if "inputs" not in journal:
        raise DsV4Error(
            f"{journal_path}: written by an older dsv4 that did not record its inputs, so the kept shards "
            "cannot be proven to come from these bytes; rerun with --overwrite"
        )
    changes = _input_changes(journal["inputs"], now)
    if changes:
        more = f" (and {len(changes) - 1} more)" if len(changes) > 1 else ""
        raise DsV4Error(
            f"{changes[0]}{more}: changed since the interrupted run began; the shards on disk came from "
            "other bytes: rerun with --overwrite"
        )


def _check_inputs_still(out: Path, before: list[dict], inputs: list[Path]) -> None:
    """Before the index makes the output look complete: the inputs did not change while being read."""
    changes = _input_changes(before, fingerprint_inputs(inputs))
    if changes:
        raise DsV4Error(
            f"{changes[0]}: changed while this run was reading it; the shards in {out} may mix two inputs "
            "and no index was written: rerun with --overwrite once the input is settled"
        )


# ---- the journal, and what --overwrite may remove -------------------------------------------------


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
        raise DsV4Error(f"{path}: unreadable progress journal ({err}); rerun with --overwrite") from None


def _ours(journal: dict | None, plan: OutputPlan, extras: list[Path]) -> set[str]:
    """Names in the folder a dsv4 run put there: what the journal lists it wrote (an older journal lists
    only finished shards: then what this plan writes, too), the index and journal, fix-config's and
    use-plugin's ``.orig`` backups of those, and the temporary ``.NAME.partial`` of each."""
    if journal is None:
        return set()
    names = {INDEX_NAME, JOURNAL_NAME, *journal["finished"]}
    names |= set(journal.get("files") or [*(sh.name for sh in plan.shards), *(e.name for e in extras)])
    names |= {n + ORIG_SUFFIX for n in names}
    return names | {f".{n}{PARTIAL_SUFFIX}" for n in names}


def _refuse_foreign(out: Path, entries: list[Path], plan: OutputPlan, extras: list[Path]) -> None:
    """--overwrite removes only what a dsv4 run wrote; a folder with anything else is refused whole,
    before anything is removed (a slip such as `convert EXPORT RELEASE --overwrite` costs nothing)."""
    try:
        journal = _load_journal(out)
    except DsV4Error:
        journal = None  # unreadable: nothing proves which files are ours
    ours = _ours(journal, plan, extras)
    foreign = [p.name + ("/" if p.is_dir() else "") for p in entries if p.name not in ours or p.is_dir()]
    if journal is None and foreign:
        raise DsV4Error(
            f"{out}: refusing --overwrite: this folder was not written by dsv4 (it holds {_shown(foreign)}); "
            "choose an empty or new folder"
        )
    if foreign:
        raise DsV4Error(
            f"{out}: refusing --overwrite: it holds files dsv4 did not write ({_shown(foreign)}: its "
            f"{JOURNAL_NAME} does not list them); move them away or choose an empty or new folder"
        )


def _interrupted(out: Path, plan: OutputPlan) -> Interrupted:
    """The Ctrl-C message, from what is on disk: the journal's finished shards that exist."""
    try:
        journal = _load_journal(out) or {"finished": {}}
    except DsV4Error:
        journal = {"finished": {}}
    kept = [sh for sh in plan.shards if sh.name in journal["finished"] and (out / sh.name).is_file()]
    if journal.get("complete") and len(kept) == len(plan.shards):
        return Interrupted(f"{out} was already complete; nothing is left to do")
    return Interrupted(
        f"{len(kept)} of {len(plan.shards)} shards of {out} are finished and kept; rerun the same command "
        "with --resume to continue"
    )


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
        Their files are fingerprinted into the journal (see :func:`fingerprint_inputs`).
    extra_files: non-tensor files (config.json, ...) copied in (temp + rename) before the index.
    resume: keep the shards a previous run of the same plan, from the same input files, finished (checked
        by ``verify``: "sha256" re-hashes them, "size" trusts size alone), redo the rest. overwrite: remove
        a previous dsv4 output first (only if everything in the folder is listed by its journal).
    Refuses, before writing anything, an output inside an input, a folder another run holds, a non-empty
    output without resume or overwrite, an overwrite of a folder dsv4 did not write, a journal from a
    different plan or from changed inputs, and an output the free disk space cannot hold. Ctrl-C raises
    :class:`Interrupted`, saying what is kept.
    """
    if verify not in ("sha256", "size"):
        raise ValueError(f"verify must be 'sha256' or 'size'; got {verify!r}")
    say = progress or (lambda msg: None)
    out = Path(out_dir).resolve()
    input_dirs = [Path(inp).resolve() for inp in inputs]
    for inp_r in input_dirs:
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
    with _OutputLock(out):
        try:
            return _write_locked(plan, out, produce, input_dirs, extras, resume, overwrite, verify, say)
        except KeyboardInterrupt:
            raise _interrupted(out, plan) from None


def _write_locked(
    plan: OutputPlan,
    out: Path,
    produce: Producer,
    inputs: list[Path],
    extras: list[Path],
    resume: bool,
    overwrite: bool,
    verify: str,
    say: Callable[[str], None],
) -> WriteResult:
    planned = {sh.name: sh for sh in plan.shards}
    try:
        entries = sorted(p for p in out.iterdir() if p.name != LOCK_NAME)
    except OSError as err:
        raise _io_error(out, err, doing="listing the output directory") from err
    partials = [p for p in entries if p.name.startswith(".") and p.name.endswith(PARTIAL_SUFFIX)]
    to_remove: list[Path] = list(partials)
    finished: dict[str, dict] = {}
    files = {INDEX_NAME, *planned, *(e.name for e in extras)}
    fingerprint = fingerprint_inputs(inputs)
    if entries and not (resume or overwrite):
        raise DsV4Error(
            f"{out}: output directory is not empty ({_shown([p.name for p in entries], 3)}); "
            "pass --resume or --overwrite"
        )
    if entries and overwrite:
        _refuse_foreign(out, entries, plan, extras)
        to_remove += [p for p in entries if p not in partials]
    elif entries and resume:
        journal = _load_journal(out)
        others = [p for p in entries if p not in partials]
        if journal is None and others:
            raise DsV4Error(
                f"{out}: nothing to resume (no {JOURNAL_NAME}) but the directory is not empty "
                f"({_shown([p.name for p in others], 3)}); pass --overwrite to start again"
            )
        if journal is not None and journal.get("plan") != plan.digest:
            raise DsV4Error(
                f"{out / JOURNAL_NAME}: the unfinished output was planned differently (other shards, keys, "
                "dtypes or shapes); pass --overwrite to start again"
            )
        if journal is not None:
            _check_inputs_unchanged(out / JOURNAL_NAME, journal, fingerprint)
            files |= set(journal.get("files") or [])
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
    free = shutil.disk_usage(out).free + sum(p.stat().st_size for p in set(to_remove) if p.exists())
    if need > free:
        raise DsV4Error(
            f"{out}: not enough free disk space: the output needs {need / GIB:.2f} GiB more "
            f"({len(todo)} shard(s) to write), {free / GIB:.2f} GiB is free"
        )

    for p in sorted(set(to_remove)):
        try:
            p.unlink(missing_ok=True)
        except OSError as err:
            raise _io_error(p, err, doing="removing the previous output") from err
    # Every name this run may write is listed before the first is written: a killed run's folder is
    # still recognised, whole, as ours by --overwrite.
    journal = {
        "format": JOURNAL_FORMAT,
        "plan": plan.digest,
        "complete": False,
        "files": sorted(files),
        "inputs": fingerprint,
        "finished": dict(finished),
    }
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
    _check_inputs_still(out, fingerprint, inputs)
    write_bytes_atomic(out / INDEX_NAME, plan.index_bytes)
    journal["complete"] = True
    write_json_atomic(out / JOURNAL_NAME, journal)
    return WriteResult(out, written, sorted(finished), plan.total_bytes)


@contextlib.contextmanager
def producer_pool(workers: int, name: str) -> Iterator[ThreadPoolExecutor]:
    """The thread pool a producer converts ahead in. Leaving it normally waits for the work; leaving it
    on an error, Ctrl-C or the writer closing the producer cancels the queued work and does not wait for
    the running jobs, so an interrupt is not held up by tensors nobody will write."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


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
        if producing:
            _discard(tmp)
            raise
        raise _io_error(final, err, key, partial=tmp) from err
    except BaseException:
        _discard(tmp)  # a failed unlink must not replace the error (or the Ctrl-C) that got us here
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
