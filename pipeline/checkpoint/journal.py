"""What a run records beside its output, and what it refuses from it.

* ``.dsv4-progress.json`` lists every file the run writes, before writing the first, and each finished
  shard with its size and digest: ``--overwrite`` removes only those (a folder holding anything else is
  refused whole, so a slip never deletes a release);
* it fingerprints the input files (size, mtime, ctime, header hash): ``--resume`` refuses to keep shards
  made from inputs that changed since, and the index is not written if they changed while being read;
* Ctrl-C's message says, from the journal, how many shards are kept.
"""

from __future__ import annotations

import hashlib
import json
import stat
from collections.abc import Iterable
from pathlib import Path

from pipeline.errors import DsV4Error, Interrupted

from .atomic import PARTIAL_SUFFIX
from .output_plan import OutputPlan
from .reader import INDEX_NAME

JOURNAL_NAME = ".dsv4-progress.json"
# 2: lists the files the run writes and fingerprints its inputs; 3: a shard's digest is digest.FIELD (a
# format-2 journal's plain sha256 is still checked on --resume)
JOURNAL_FORMAT = 3
ORIG_SUFFIX = ".orig"  # dsv4 fix-config / use-plugin back a file up as NAME.orig beside it


def _shown(names: list[str], limit: int = 4) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


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
