"""The server process: started as a child in its own process group with its output in a log file,
stopped with SIGTERM (vLLM shuts its workers down) and then SIGKILL to whatever it started that is left
(pipeline.children). It gets SIGINT at its default even when `dsv4 serve` was started with it ignored
(``nohup ... &``)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from pipeline import children
from pipeline.errors import DsV4Error


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "(no log)"
    tail = text.splitlines()[-lines:]
    return "\n".join(tail) if tail else "(empty log)"


def last_line(path: Path) -> str:
    tail = log_tail(path, 1)
    return tail if len(tail) <= 160 else tail[:157] + "..."


def start_server(command: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None):
    """The server as a child in its own session and process group (so stopping it reaches its workers,
    and a Ctrl-C here reaches only us: our ``finally`` stops it), SIGINT at its default even when we were
    started with it ignored, its stdout and stderr in ``log_path`` (truncated: the tail shown on failure
    is this run's)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        try:
            return children.popen(
                list(command),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=None if env is None else dict(env),
            )
        except OSError as err:
            raise DsV4Error(f"cannot start {command[0]}: {err}") from err


def stop_server(proc, *, grace: float = 60.0) -> int | None:
    """SIGTERM to the server (vLLM stops its engine and workers), then, after ``grace`` seconds or once it
    has exited, SIGKILL to whatever it started that is left (pipeline.children: its tree as it was before
    the SIGTERM, own sessions included) and to its process group. Its exit status."""
    root = children.identify(proc.pid) if proc.poll() is None else None
    started = children.tree([root]) if root else []  # before the SIGTERM orphans any of it
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    children.kill_tree(started)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # the group we created: workers that outlived the server
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        return None
