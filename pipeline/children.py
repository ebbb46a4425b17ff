"""Child processes that may have to be interrupted: started with SIGINT at its default, and killed
together with everything they started.

Why SIGINT needs restoring: a process started with SIGINT ignored (``nohup cmd &``, ``&`` in a
non-interactive shell, some CI runners) passes SIG_IGN on to its children through fork and exec, and
CPython keeps an inherited SIG_IGN instead of installing its KeyboardInterrupt handler. A child of such a
parent ignores the SIGINT meant to stop it gracefully (its ``finally`` blocks never run). subprocess
cannot reset it: ``restore_signals`` covers SIGPIPE, SIGXFZ and SIGXFSZ only, and ``preexec_fn`` may
deadlock when the parent has threads (pytest-xdist's workers do). So when SIGINT is not going to reach
the child at its default, ``popen`` starts it through a two-line Python trampoline that sets SIG_DFL and
execs the real program: the same pid, the same argv, one interpreter start-up more (tens of ms). A
program that is Python then installs its KeyboardInterrupt handler as usual.

Why a process tree rather than a process group: a child may start its own session (`dsv4 serve` starts
vLLM with ``start_new_session=True``), which a ``killpg`` of the child's group misses, and once its parent
is gone it is re-parented to init and no longer found from the child. ``tree`` walks /proc's parent
links; ``kill_tree`` stops what it finds (a stopped process cannot fork), walks again until nothing new
turns up, then SIGKILLs them all. Callers take a ``tree`` snapshot before they start a graceful stop, so
that what the stop orphans is still killed afterwards. Each process is identified by pid and start time,
so a pid reused meanwhile is never signalled. Without /proc (not Linux) only the given processes are
killed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")

# Run as `python -I -S -c TRAMPOLINE PATH ARGV0 ARGS...`: isolated and without site, it imports only
# built-in modules, so it works from any interpreter and whatever the environment holds.
TRAMPOLINE = (
    "import os, signal, sys\n"
    "signal.signal(signal.SIGINT, signal.SIG_DFL)\n"
    "try:\n"
    "    os.execv(sys.argv[1], sys.argv[2:])\n"
    "except OSError as err:\n"
    "    sys.stderr.write(f'cannot start {sys.argv[1]}: {err}\\n')\n"
    "    os._exit(127)\n"
)


def sigint_reaches_children() -> bool:
    """True if a child started from here gets SIGINT at SIG_DFL: this process handles it (exec resets a
    handler to the default) or leaves it at the default. False when it is ignored (inherited SIG_IGN)
    or set outside Python (getsignal answers None)."""
    current = signal.getsignal(signal.SIGINT)
    return current is signal.SIG_DFL or callable(current)


def resolve(program: str, env: Mapping[str, str] | None = None, cwd: str | os.PathLike | None = None) -> str:
    """``program`` as exec would find it (PATH of ``env``, a relative path from ``cwd``); FileNotFoundError
    as subprocess.Popen raises it when there is none, so callers see the same error either way."""
    if os.sep in program:
        path = os.path.join(cwd or ".", program)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return os.path.abspath(path)
    else:
        found = shutil.which(program, path=(os.environ if env is None else env).get("PATH", os.defpath))
        if found:
            return found
    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)


def sigint_default_argv(
    argv: Sequence[str], env: Mapping[str, str] | None = None, cwd: str | os.PathLike | None = None
) -> list[str]:
    """``argv`` wrapped in the trampoline that resets SIGINT to its default before exec."""
    argv = [str(a) for a in argv]
    return [sys.executable, "-I", "-S", "-c", TRAMPOLINE, resolve(argv[0], env, cwd), *argv]


def popen(argv: Sequence[str], **kwargs) -> subprocess.Popen:
    """subprocess.Popen(argv, **kwargs), the child's SIGINT at its default whatever this process inherited."""
    argv = [str(a) for a in argv]
    if not sigint_reaches_children():
        argv = sigint_default_argv(argv, kwargs.get("env"), kwargs.get("cwd"))
    return subprocess.Popen(argv, **kwargs)


# ---- process trees ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Proc:
    pid: int
    start: int  # start time, clock ticks after boot (/proc/PID/stat field 22): tells a reused pid apart


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of a live (or zombie) process, None if there is none."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except (OSError, ValueError):
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
    return int(fields[1]), int(fields[19])


def _parents() -> dict[int, tuple[int, int]]:
    """{pid: (parent pid, start time)} of every process /proc shows."""
    out = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir(PROC):
            if entry.name.isdigit():
                st = _stat(int(entry.name))
                if st is not None:
                    out[int(entry.name)] = st
    return out


def identify(pid: int) -> Proc | None:
    st = _stat(pid)
    return None if st is None else Proc(pid, st[1])


def alive(proc: Proc) -> bool:
    st = _stat(proc.pid)
    return st is not None and st[1] == proc.start


def tree(roots: Iterable[Proc]) -> list[Proc]:
    """``roots`` that are still alive and all their descendants, parents before children."""
    table = _parents()
    kids: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        kids.setdefault(ppid, []).append(pid)
    found = [r for r in roots if r.pid in table and table[r.pid][1] == r.start]
    seen = {r.pid for r in found}
    i = 0
    while i < len(found):
        for pid in kids.get(found[i].pid, ()):
            if pid not in seen:
                seen.add(pid)
                found.append(Proc(pid, table[pid][1]))
        i += 1
    return found


def _signal(proc: Proc, signum: int) -> None:
    if alive(proc):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(proc.pid, signum)


def kill_tree(roots: Iterable[Proc]) -> list[Proc]:
    """SIGKILL ``roots`` and every descendant, own sessions included. Each is stopped first and the tree
    walked again until it has no new member, so nothing forks between the walk and the kill. Returns
    the processes signalled."""
    stopped: dict[int, Proc] = {}
    roots = list(roots)
    while True:
        new = [p for p in tree([*roots, *stopped.values()]) if p.pid not in stopped and p.pid != os.getpid()]
        if not new:
            break
        for p in new:
            _signal(p, signal.SIGSTOP)
            stopped[p.pid] = p
    for p in stopped.values():
        _signal(p, signal.SIGKILL)
    return list(stopped.values())
