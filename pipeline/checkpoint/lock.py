"""One run per output folder: an exclusive ``flock`` on ``DST/.dsv4.lock``, held from before the journal
is read to the end of the run; a second run is refused, naming the holder."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path

from pipeline.errors import DsV4Error

from .atomic import _discard, _io_error

LOCK_NAME = ".dsv4.lock"


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
    :func:`.writer.write_checkpoint` (``dsv4 quantize``: ModelOpt writes a sibling ``.DST.partial``)."""
    return _OutputLock(out, path, subject)
