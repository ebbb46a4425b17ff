"""Planned, streaming, crash-safe writing of sharded safetensors checkpoints.

The output is planned up front from headers (:class:`OutputPlan`: shards, each an ordered list of
(key, dtype, shape)), so every size, the disk need and the final index are known before any data is
produced. :func:`write_checkpoint` then writes one shard at a time, tensor by tensor, as a producer
yields them (a producer that can, :class:`.producer.AcrossShards`, is asked once for every shard left
to write, so that its converters run on across each shard's end):

* each shard goes to ``.<name>.partial`` in the output dir, is flushed, fsynced and renamed;
* a journal (``.dsv4-progress.json``) records each finished shard with its size and digest (sha256 by
  pieces, :mod:`.digest`), hashed on threads while the bytes are written (no re-read), and the digest of
  the plan it belongs to;
* ``model.safetensors.index.json`` is written last (temp + rename), then the journal is marked complete.

A killed run leaves at most a ``.partial`` file and a journal, never an index or a final-named shard
that is incomplete. ``resume=True`` re-hashes the shards the journal lists (a disk-bound read, far
cheaper than producing them again), keeps those that match and redoes the rest; the header bytes come
from the plan alone, so a resumed run's bytes equal an uninterrupted run's.

Output safety: one run per output folder (:mod:`.lock`); the journal lists every file the run writes
and fingerprints the inputs, so that ``overwrite=True`` removes only what dsv4 wrote and ``resume=True``
keeps no shard made from inputs that changed since (:mod:`.journal`); Ctrl-C removes the partial shard
and raises :class:`pipeline.errors.Interrupted` saying how many shards are kept; an OSError while
writing becomes one :class:`DsV4Error` naming the path, what failed and what to do, and a failing
cleanup never hides it (:mod:`.atomic`).

This module is the top of that small stack: output_plan, producer, atomic (small files via temp +
rename), lock, journal; it re-exports the names callers import from here.
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.errors import DsV4Error

from . import atomic, digest, dtypes
from .atomic import (
    PARTIAL_SUFFIX,
    _discard,
    _fsync_dir,
    _io_error,
    copy_file_atomic,
    write_bytes_atomic,
    write_json_atomic,
)
from .journal import (
    JOURNAL_FORMAT,
    JOURNAL_NAME,
    _check_inputs_still,
    _check_inputs_unchanged,
    _interrupted,
    _load_journal,
    _refuse_foreign,
    _shown,
    fingerprint_inputs,
)
from .lock import LOCK_NAME, _OutputLock
from .lock import output_lock as output_lock
from .output_plan import GIB, OutputPlan, PlannedTensor, ShardPlan
from .output_plan import plan_shards as plan_shards
from .producer import Producer
from .producer import per_tensor as per_tensor
from .producer import producer_pool as producer_pool
from .reader import INDEX_NAME


@dataclass
class WriteResult:
    out_dir: Path
    written: list[str]
    skipped: list[str]  # finished shards kept on resume
    total_bytes: int


def is_within(child: Path, parent: Path) -> bool:
    """``child`` is ``parent`` or lies under it (both resolved by the caller): an output inside an input."""
    return child == parent or parent in child.parents


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
        if is_within(out, inp_r):
            raise DsV4Error(
                f"{out}: refusing to write the output inside the input {inp_r}; choose another directory"
            )
        if is_within(inp_r, out):
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
            if verify == "sha256" and not digest.matches(path, rec):
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
    # a producer that streams across shards gets every shard to write at once (producer.AcrossShards)
    across = getattr(produce, "across", None)
    stream = iter(across(todo)) if across is not None else None
    try:
        for i, sh in enumerate(plan.shards):
            if sh.name in finished:
                say(f"[{i + 1}/{len(plan.shards)}] {sh.name}: finished earlier, kept")
                continue
            say(f"[{i + 1}/{len(plan.shards)}] {sh.name}: writing {sh.file_size / GIB:.2f} GiB")
            items = produce(sh) if stream is None else itertools.islice(stream, len(sh.tensors))
            size, sha = _write_shard(sh, out, items)
            done = {**journal["finished"], sh.name: digest.record(size, sha)}
            # in plan order, however the shards came to be finished: a resumed run's journal equals a whole run's
            journal["finished"] = {s.name: done[s.name] for s in plan.shards if s.name in done}
            write_json_atomic(out / JOURNAL_NAME, journal)
            written.append(sh.name)
        if stream is not None and (extra := next(stream, None)) is not None:
            raise DsV4Error(f"{out}: key {extra[0]}: the producer yielded more tensors than the shards plan")
    finally:
        close = getattr(stream, "close", None)
        if close is not None:  # stops its converters (a Ctrl-C or an error does not wait for them)
            close()
    for e in extras:
        copy_file_atomic(e, out)
    _check_inputs_still(out, fingerprint, inputs)
    write_bytes_atomic(out / INDEX_NAME, plan.index_bytes)
    journal["complete"] = True
    write_json_atomic(out / JOURNAL_NAME, journal)
    return WriteResult(out, written, sorted(finished), plan.total_bytes)


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes, without a copy for a contiguous CPU tensor (what every producer yields).

    One torch call, not five: each releases the GIL and takes it back, and the writer, which every byte
    waits for, queued for it behind the converter threads each time (py-spy on 16 cores: 1.8 s of a
    profiled 6 s ``convert --amax`` run's writer time on that one line)."""
    if t.device.type != "cpu" or not t.is_contiguous():
        t = t.detach().to("cpu").contiguous()
    if 0 in t.shape:
        return memoryview(b"")
    if t.dim() == 0:
        t = t.reshape(1)
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


class _Writeback:
    """Starts the kernel's writeback of a shard's bytes while the shard is still being written.

    Left alone, Linux writes dirty pages back only once they pass dirty_background_ratio (10 % of RAM)
    or age 30 s, so the disk idles while a shard is produced and the shard's closing fsync then waits
    for most of it: production and disk time add up. Asking for writeback every STEP bytes
    (posix_fadvise DONTNEED: starts it without waiting, and drops pages already written back, which
    nothing here reads again) keeps the disk busy during production, and the fsync finds little left.
    Only when and where the page cache is written changes, never a byte; where the OS lacks
    posix_fadvise this does nothing.
    """

    STEP = 64 * 1024 * 1024

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._started = 0  # writeback asked for up to here
        self._previous = 0  # ... and up to here one step before: by now written back, dropped from cache

    def wrote(self, end: int) -> None:
        if end - self._started < self.STEP or not hasattr(os, "posix_fadvise"):
            return
        os.posix_fadvise(self._fd, self._started, end - self._started, os.POSIX_FADV_DONTNEED)
        if self._started > self._previous:
            os.posix_fadvise(self._fd, self._previous, self._started - self._previous, os.POSIX_FADV_DONTNEED)
        self._previous, self._started = self._started, end


def _write_shard(sh: ShardPlan, out: Path, produced: Iterable[tuple[str, torch.Tensor]]) -> tuple[int, str]:
    final = out / sh.name
    tmp = out / f".{sh.name}{PARTIAL_SUFFIX}"
    h = digest.PieceHasher()
    size = 0
    key: str | None = None
    items = iter(produced)
    producing = False  # an OSError raised by the producer (reading its input) is its own, not a write error
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        writeback = _Writeback(fd)
        try:
            atomic._write_all(fd, sh.header_bytes)
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
                atomic._write_all(fd, data)
                h.update(data)
                size += len(data)
                writeback.wrote(size)
            key = None
            producing = True
            extra = next(items, None)
            producing = False
            if extra is not None:
                raise DsV4Error(
                    f"{final}: key {extra[0]}: the producer yielded more tensors than the shard plans"
                )
            os.fsync(fd)  # the hash threads finish the last pieces meanwhile
            sha = h.hexdigest()
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
    return size, sha


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
