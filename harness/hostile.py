"""Hostile inputs (issue 13): builders that turn a private copy of a tiny checkpoint into what a user trips
over, a way to run `dsv4` on it as a user does, and the one assertion every hostile-input case makes.

The builders mutate a copy the caller owns (never a session master) and return what the refusal must
name. Headers are parsed here by hand (8-byte little-endian length + JSON), independently of
pipeline.checkpoint.reader, which is what the cases put under test.

The contract (:func:`assert_refused`): exit status 2; stderr one line, ``dsv4: error: ...``, naming the file
or key; no traceback; every byte of every input (and of any folder the command must leave alone)
unchanged; no output folder that looks complete (an index, or a journal marked complete).
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import io
import json
import os
import re
import shutil
import stat
import threading
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.checkpoints import tree_digest

INDEX = "model.safetensors.index.json"
CONFIG = "config.json"
HF_QUANT_CONFIG = "hf_quant_config.json"
JOURNAL = ".dsv4-progress.json"
FIFO_TIMEOUT_S = 20.0  # a command that blocks on a FIFO longer than this has hung

# ---- reading headers by hand ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Located:
    """Where one tensor's bytes are: its shard, dtype, and absolute byte range in the file."""

    key: str
    file: Path
    dtype: str
    begin: int
    end: int


def header_entries(shard: Path) -> tuple[int, list[tuple[str, object]]]:
    """(header length, [(name, entry)] in file order, __metadata__ included)."""
    with shard.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
    return n, list(json.loads(raw).items())


def shard_files(ckpt: Path) -> list[Path]:
    """The shards a checkpoint's index names (sorted), or its *.safetensors without an index."""
    index = ckpt / INDEX
    if index.is_file():
        return [ckpt / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return sorted(ckpt.glob("*.safetensors"))


def locate_all(ckpt: Path) -> dict[str, Located]:
    out: dict[str, Located] = {}
    for shard in shard_files(ckpt):
        n, entries = header_entries(shard)
        for key, entry in entries:
            if key != "__metadata__":
                b, e = entry["data_offsets"]
                out[key] = Located(key, shard, entry["dtype"], 8 + n + b, 8 + n + e)
    return out


def keys_matching(ckpt: Path, pattern: str) -> list[str]:
    keys = sorted(k for k in locate_all(ckpt) if re.search(pattern, k))
    if not keys:
        raise ValueError(f"{ckpt}: no key matches {pattern!r}")
    return keys


# ---- byte-level edits (mtime kept: the file looks untouched) -------------------------------------------

_TORCH_DTYPES = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E8M0": torch.float8_e8m0fnu,
}


def encode(dtype: str, value: float) -> bytes:
    """One element of ``dtype`` holding ``value``, as torch rounds it (NaN: 0x7F in E4M3, 0xFF in E8M0)."""
    return (
        torch.tensor([value], dtype=torch.float32)
        .to(_TORCH_DTYPES[dtype])
        .view(torch.uint8)
        .numpy()
        .tobytes()
    )


def poke(path: Path, offset: int, data: bytes) -> None:
    """Overwrite bytes in place, keeping the file's size and modification time."""
    st = path.stat()
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def set_element(ckpt: Path, key: str, value: float, element: int = 0) -> Located:
    """Set one element of tensor ``key`` to ``value`` (in its own dtype); returns where it is."""
    loc = locate_all(ckpt)[key]
    raw = encode(loc.dtype, value)
    poke(loc.file, loc.begin + element * len(raw), raw)
    return loc


def flip_low_bit(ckpt: Path, key: str) -> Located:
    """Same headers, same size, same mtime, different bytes: the lowest bit of the tensor's first byte
    (a float's last mantissa bit: still a valid, nearby value)."""
    loc = locate_all(ckpt)[key]
    with loc.file.open("rb") as f:
        f.seek(loc.begin)
        first = f.read(1)[0]
    poke(loc.file, loc.begin, bytes([first ^ 1]))
    return loc


def duplicate_first_key(shard: Path) -> str:
    """Rewrite ``shard``'s header with its first tensor's entry written twice (JSON built by hand: a
    parser that keeps the last one sees a valid header). Returns the repeated key."""
    n, entries = header_entries(shard)
    data = shard.read_bytes()[8 + n :]
    first = next(i for i, (k, _) in enumerate(entries) if k != "__metadata__")
    entries.insert(first + 1, entries[first])
    text = "{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in entries) + "}"
    raw = text.encode()
    raw += b" " * (-len(raw) % 8)
    shard.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return entries[first][0]


# ---- files that are not regular files -----------------------------------------------------------------


def replace_with_fifo(path: Path) -> Path:
    path.unlink()
    os.mkfifo(path)
    return path


def replace_with_dir(path: Path) -> Path:
    path.unlink()
    path.mkdir()
    return path


NON_REGULAR: dict[str, Callable[[Path], Path]] = {"fifo": replace_with_fifo, "dir": replace_with_dir}


def target_file(ckpt: Path, target: str) -> Path:
    """'shard' (the first the index names), 'index', 'config' or 'hf_quant_config' of ``ckpt``."""
    if target == "shard":
        return shard_files(ckpt)[0]
    return ckpt / {"index": INDEX, "config": CONFIG, "hf_quant_config": HF_QUANT_CONFIG}[target]


# ---- index entries that leave the checkpoint folder ---------------------------------------------------


def add_index(ckpt: Path) -> Path:
    """Give a single-file checkpoint the index a sharded one has (every key -> its one shard)."""
    (shard,) = sorted(ckpt.glob("*.safetensors"))
    keys = [k for k, _ in header_entries(shard)[1] if k != "__metadata__"]
    index = {"metadata": {"total_size": shard.stat().st_size}, "weight_map": dict.fromkeys(keys, shard.name)}
    (ckpt / INDEX).write_text(json.dumps(index, indent=2))
    return ckpt / INDEX


# escape -> (folder the shard moves to, given the checkpoint; the weight_map entry, given that path)
ESCAPES: dict[str, tuple[Callable[[Path], Path], Callable[[Path, Path], str]]] = {
    "parent": (lambda ckpt: ckpt.parent / "elsewhere", lambda ckpt, p: f"../elsewhere/{p.name}"),
    "absolute": (lambda ckpt: ckpt.parent / "absolute", lambda ckpt, p: str(p)),
    "subfolder": (lambda ckpt: ckpt / "sub", lambda ckpt, p: f"sub/{p.name}"),
}


def move_shard_out(ckpt: Path, escape: str) -> tuple[str, list[str]]:
    """Move the first shard to where ``escape`` says and point its index entries there (the data is
    intact: a loader that follows the entry finds it). Returns (the entry, the keys it holds)."""
    folder, entry_for = ESCAPES[escape]
    index_path = ckpt / INDEX
    index = json.loads(index_path.read_text())
    shard = shard_files(ckpt)[0]
    dest = folder(ckpt) / shard.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(shard, dest)
    entry = entry_for(ckpt, dest)
    keys = [k for k, v in index["weight_map"].items() if v == shard.name]
    index["weight_map"].update(dict.fromkeys(keys, entry))
    index_path.write_text(json.dumps(index, indent=2))
    return entry, keys


# ---- configs -------------------------------------------------------------------------------------------


def set_quant_method(ckpt: Path, method: str | None) -> Path:
    """config.json's quantization_config.quant_method set to ``method``, or the block removed (None)."""
    path = ckpt / CONFIG
    config = json.loads(path.read_text())
    if method is None:
        config.pop("quantization_config", None)
    else:
        config["quantization_config"] = {**config.get("quantization_config", {}), "quant_method": method}
    path.write_text(json.dumps(config, indent=2))
    return path


# ---- a folder's state -----------------------------------------------------------------------------------


def snapshot(*roots: Path) -> dict[str, str]:
    """{path: content digest, or the kind of a non-regular entry} under every root (a FIFO is never
    opened): "every input byte unchanged" is equality of two snapshots."""
    out: dict[str, str] = {}
    for root in map(Path, roots):
        if not root.exists():
            out[str(root)] = "absent"
            continue
        if root.is_file():
            out[str(root)] = tree_digest(root.parent).get(root.name, "?")
            continue
        out.update({str(root / rel): digest for rel, digest in tree_digest(root).items()})
        for p in root.rglob("*"):
            mode = p.lstat().st_mode
            if not stat.S_ISREG(mode):
                out[str(p)] = "fifo" if stat.S_ISFIFO(mode) else "dir" if stat.S_ISDIR(mode) else "other"
    return out


def diff(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return [
        f"{p}: {before.get(p, 'absent')} -> {after.get(p, 'absent')}"
        for p in sorted(before.keys() | after.keys())
        if before.get(p) != after.get(p)
    ]


def looks_complete(out: Path) -> str | None:
    """Why ``out`` looks like a finished output (an index, a journal marked complete), or None."""
    if (out / INDEX).exists():
        return f"{out / INDEX} exists"
    journal = out / JOURNAL
    if journal.is_file():
        try:
            if json.loads(journal.read_text()).get("complete") is True:
                return f"{journal} is marked complete"
        except (OSError, ValueError):
            pass
    return None


# ---- running dsv4 as a user does ------------------------------------------------------------------------


@dataclass
class Outcome:
    rc: int | None
    out: str
    err: str
    raised: str | None = None  # the traceback a user would have seen
    hung: bool = False

    def show(self) -> str:
        tail = f"\nuncaught:\n{self.raised}" if self.raised else ""
        return f"rc={self.rc}{' (hung)' if self.hung else ''}\nstdout:\n{self.out}\nstderr:\n{self.err}{tail}"


def run_dsv4(argv: Iterable[object], capsys, *, fifos: Iterable[Path] = ()) -> Outcome:
    """`dsv4 ARGV` in this process (pipeline.cli.main, every subcommand). With ``fifos``, in a thread:
    if it is still running after FIFO_TIMEOUT_S it has hung on one; the FIFOs' write ends are then
    opened and closed until it sees end-of-file and returns, so a regression fails, never hangs."""
    from pipeline import cli

    argv = [str(a) for a in argv]
    box: dict[str, object] = {}

    def call() -> None:
        try:
            box["rc"] = cli.main(argv)
        except SystemExit as exc:  # argparse usage errors
            box["rc"] = exc.code if isinstance(exc.code, int) else 2
        except BaseException:  # what escapes main is what a user sees as a traceback
            box["raised"] = traceback.format_exc()

    fifos = list(fifos)
    hung = False
    if not fifos:
        call()
    else:
        worker = threading.Thread(target=call, name="dsv4-hostile", daemon=True)
        worker.start()
        worker.join(FIFO_TIMEOUT_S)
        hung = worker.is_alive()
        for _ in range(500):
            if not worker.is_alive():
                break
            _unblock(fifos)
            worker.join(0.02)
    out, err = capsys.readouterr()
    return Outcome(box.get("rc"), out, err, box.get("raised"), hung)


def _unblock(fifos: list[Path]) -> None:
    for fifo in fifos:
        with contextlib.suppress(OSError):  # ENXIO: no reader yet; or it is gone
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


def assert_refused(
    outcome: Outcome,
    *,
    names: Iterable[str],
    before: dict[str, str],
    protected: Iterable[Path],
    outputs: Iterable[Path] = (),
    checker: bool = False,
) -> None:
    """The contract of issue 13, every part checked and every violation reported at once.

    names: the refusal must contain one of them (a file name, a path, a key). before/protected: the
    snapshot of the protected paths taken before the run. outputs: folders that must not look complete.
    checker: `dsv4 validate`, whose documented answer to a bad checkpoint is exit 1 with a ``problem:``
    line naming it (exit 2 with one error line is accepted too).
    """
    names = [str(n) for n in names]
    wrong: list[str] = []
    if outcome.hung:
        wrong.append(f"hung for {FIFO_TIMEOUT_S:.0f} s on a FIFO (it must be refused before it is opened)")
    if outcome.raised:
        wrong.append("an uncaught exception (the user sees a traceback)")
    if "Traceback" in outcome.out + outcome.err:
        wrong.append("a traceback in the output")
    if checker and outcome.rc == 1:
        problems = [line for line in outcome.out.splitlines() if line.startswith("problem:")]
        if "INVALID" not in outcome.out or not any(n in line for line in problems for n in names):
            wrong.append(f"validate exit 1 without a problem line naming one of {names}")
    elif outcome.rc != 2:
        wrong.append(f"exit status {outcome.rc}, expected 2")
    else:
        lines = [line for line in outcome.err.splitlines() if line.strip()]
        if len(lines) != 1 or not lines[0].startswith("dsv4: error: "):
            wrong.append(f"stderr has {len(lines)} line(s), expected one 'dsv4: error: ...' line")
        elif not any(n in lines[0] for n in names):
            wrong.append(f"the error line names none of {names}")
    changed = diff(before, snapshot(*protected))
    if changed:
        wrong.append("input bytes changed: " + "; ".join(changed[:5]))
    for out in outputs:
        if why := looks_complete(Path(out)):
            wrong.append(f"an output that looks complete: {why}")
    assert not wrong, "; ".join(wrong) + "\n" + outcome.show()


# ---- a read-only file system, in this process ----------------------------------------------------------


@contextlib.contextmanager
def read_only(root: Path) -> Iterator[None]:
    """Every attempt to create, open for writing, rename into or make a folder under ``root`` fails with
    EROFS, as on a read-only mount (root ignores permission bits, so chmod cannot stand in for one)."""
    root = Path(root).resolve()
    names = ("open", "mkdir", "replace", "rename", "link", "symlink", "unlink", "remove", "rmdir")
    saved = {name: getattr(os, name) for name in names}
    real_io_open = io.open

    def under(path: object) -> bool:
        try:
            p = Path(os.fsdecode(path)).resolve()
        except (TypeError, ValueError):
            return False
        return p == root or root in p.parents

    def refuse(path: object) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))

    def os_open(path, flags, *args, **kw):
        if under(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC):
            refuse(path)
        return saved["open"](path, flags, *args, **kw)

    def io_open(file, mode="r", *args, **kw):
        if not isinstance(file, int) and under(file) and set(mode) & set("wax+"):
            refuse(file)
        return real_io_open(file, mode, *args, **kw)

    def guarded(name: str, *positions: int):
        real = saved[name]

        def call(*args, **kw):
            for i in positions:
                if i < len(args) and under(args[i]):
                    refuse(args[i])
            return real(*args, **kw)

        return call

    patched = {
        "open": os_open,
        "mkdir": guarded("mkdir", 0),
        "replace": guarded("replace", 0, 1),
        "rename": guarded("rename", 0, 1),
        "link": guarded("link", 1),
        "symlink": guarded("symlink", 1),
        "unlink": guarded("unlink", 0),
        "remove": guarded("remove", 0),
        "rmdir": guarded("rmdir", 0),
    }
    try:
        for name, fn in patched.items():
            setattr(os, name, fn)
        io.open = builtins.open = io_open
        yield
    finally:
        for name, fn in saved.items():
            setattr(os, name, fn)
        io.open = builtins.open = real_io_open


def copy_tree(src: Path, dst: Path) -> Path:
    """A private copy of a checkpoint folder (parents created)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, dst)
    return dst


# ---- two runs into one output folder (class 3) ----------------------------------------------------------

LOCK = ".dsv4.lock"  # pipeline.checkpoint.lock.LOCK_NAME, spelled here independently
SECOND_RUN_S = 60.0  # (a real quantize takes ~20 s on a loaded 2-core machine) a second run still going after this is waiting for the lock instead of refusing it


def flock_holders(path: Path) -> set[int]:
    """The pids /proc/locks lists as holding a flock on ``path``'s inode (waiters left out): whether a run
    holds its output's lock, seen without taking it (a probing flock would make the holder's own attempt
    fail). Matched on the inode alone: under overlayfs stat's device is not the one the lock is on."""
    try:
        ino = os.stat(path).st_ino
    except FileNotFoundError:
        return set()
    pids: set[int] = set()
    # "1: FLOCK  ADVISORY  WRITE 32291 fe:00:2146366 0 EOF"; a waiter's reads "1: -> FLOCK ...": left out
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5].endswith(f":{ino}"):
            pids.add(int(fields[4]))
    return pids


def lock_holder(out: Path) -> dict | None:
    """What the run holding ``out``'s lock wrote about itself (pid, host, started, command), or None."""
    try:
        info = json.loads((Path(out) / LOCK).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def run_dsv4_bounded(
    argv: Iterable[object], capsys, *, unstick: Callable[[], None], timeout_s: float = SECOND_RUN_S
) -> Outcome:
    """`dsv4 ARGV` in this process, in a thread. Still running after ``timeout_s`` it has hung (e.g. it
    waits for a lock it must refuse): ``unstick()`` (e.g. killing the run it waits for) lets it return,
    and the outcome says ``hung``, so a regression fails instead of hanging the suite."""
    from pipeline import cli

    argv = [str(a) for a in argv]
    box: dict[str, object] = {}

    def call() -> None:
        try:
            box["rc"] = cli.main(argv)
        except SystemExit as exc:
            box["rc"] = exc.code if isinstance(exc.code, int) else 2
        except BaseException:
            box["raised"] = traceback.format_exc()

    worker = threading.Thread(target=call, name="dsv4-second-run", daemon=True)
    worker.start()
    worker.join(timeout_s)
    hung = worker.is_alive()
    if hung:
        unstick()
        worker.join(timeout_s)
    out, err = capsys.readouterr()
    return Outcome(box.get("rc"), out, err, box.get("raised"), hung)


def assert_refused_as_held(
    outcome: Outcome,
    *,
    out: Path,
    pid: int,
    before: dict[str, str],
    protected: Iterable[Path],
    lock: Path | None = None,
) -> None:
    """A second run into ``out`` while process ``pid`` writes it: the contract of :func:`assert_refused`
    (exit 2, one line, no traceback, every protected byte unchanged, ``out`` not complete), the line naming
    both the folder and the holder's pid, and the holder still holding its lock on the same file (``lock``,
    by default ``out/.dsv4.lock``; it must be under ``protected``)."""
    out = Path(out)
    lock = Path(lock) if lock is not None else out / LOCK
    assert not outcome.hung, (
        f"the second run was still running after {SECOND_RUN_S:.0f} s: it waited for the lock instead of "
        "refusing\n" + outcome.show()
    )
    lock_before = before.get(str(lock))
    assert_refused(outcome, names=[str(out)], before=before, protected=protected, outputs=[out])
    line = outcome.err.strip()
    assert re.search(rf"\bpid {pid}\b", line), f"the error line does not name the holder, pid {pid}: {line}"
    assert lock_before not in (None, "absent"), f"{lock} was not there to begin with"
    held = flock_holders(lock)
    assert held == {pid}, f"after the refusal {lock} is locked by {held or 'nobody'}, not by pid {pid}"


def locks_held_by(pid: int, folder: Path) -> list[Path]:
    """The files in ``folder`` (hidden ones included) that process ``pid`` holds a flock on."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and pid in flock_holders(p))


HELD_READY_S = 180.0  # bounded wait for a held run to reach its hold
HELD_FINISH_S = 180.0  # bounded wait for it to end once let go


class HeldRun:
    """A run as a process of its own (``python -c SCRIPT ARGS`` in ``cwd``), held where SCRIPT prints a line
    ``READY`` and reads one from stdin: the test's go-ahead (end-of-file too, so a test that died never
    leaves it waiting). Caught at the same point every time, it can be frozen (SIGSTOP, waited for, so no
    race), thawed, let go, or killed with SIGKILL. Its stderr goes to a file: a pipe nobody reads while it
    is held could fill and block it."""

    def __init__(self, script: str, args: Iterable[object], cwd: Path) -> None:
        import subprocess
        import sys
        import tempfile

        self._err = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", script, *map(str, args)],
            cwd=cwd,
            env={**os.environ, "PYTHONPATH": str(cwd)},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._err,
        )
        self.pid = self.proc.pid
        self.out = b""

    def stderr(self) -> str:
        self._err.seek(0)
        return self._err.read().decode(errors="replace")

    def wait_ready(self, timeout_s: float = HELD_READY_S) -> None:
        import select
        import time

        deadline = time.monotonic() + timeout_s
        fd = self.proc.stdout.fileno()
        while b"READY" not in self.out.splitlines():
            left = deadline - time.monotonic()
            chunk = os.read(fd, 1 << 16) if left > 0 and select.select([fd], [], [], left)[0] else b""
            if not chunk:  # it ended, or the time is up
                self.close()
                raise AssertionError(
                    f"the held run never reached its hold (rc {self.proc.returncode}):\n{self.stderr()[-4000:]}"
                )
            self.out += chunk

    def freeze(self) -> None:
        import signal

        os.kill(self.pid, signal.SIGSTOP)
        _, status = os.waitpid(self.pid, os.WUNTRACED)  # returns once it is stopped
        assert os.WIFSTOPPED(status)

    def thaw(self) -> None:
        import signal

        os.kill(self.pid, signal.SIGCONT)

    def finish(self, timeout_s: float = HELD_FINISH_S) -> tuple[int, str]:
        """Let it go; (exit status, stderr)."""
        out, _ = self.proc.communicate(b"go\n", timeout=timeout_s)
        self.out += out
        return self.proc.returncode, self.stderr()

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.communicate()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # SIGKILL ends a stopped process too
            self.proc.communicate()
        if not self._err.closed:
            self._err.close()
