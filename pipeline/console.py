"""Output a person reads: third-party chatter goes to a log file, ours stays on the terminal.

transformers and ModelOpt write progress bars (with ``\\r``), version warnings naming site-packages, ANSI
bold and "Inserted N quantizers" lines to stdout, stderr, their loggers and ``warnings``. While a step
calls into them it runs inside ``third_party_output(log)``: all of that goes to ``log`` (each ``\\r``-redrawn
bar kept as its last state, ANSI codes removed) and one line of ours names the file. Our own lines
written during the capture go to ``terminal_stdout()`` / ``terminal_stderr()``, the streams from before it.
Captures nest: an inner one (``dsv4 quantize`` inside ``dsv4 e2e``) writes to the outer one's log.
"""

from __future__ import annotations

import io
import logging
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_CONTROL = re.compile(r"(\r|\n)")


class _Capture:
    def __init__(self, path: Path, stdout: TextIO, stderr: TextIO, stream: LogStream, what: str) -> None:
        self.path, self.stdout, self.stderr, self.stream, self.what = path, stdout, stderr, stream, what
        self.file: TextIO | None = None

    def begin(self) -> None:
        if self.file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = self.path.open("a", encoding="utf-8")
            print(f"  ({self.what}: {self.path})", file=self.stdout, flush=True)
            argv = " ".join([Path(sys.argv[0]).name, *sys.argv[1:2]])
            self.stream.start(self.file, f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {argv}")


_active: list[_Capture] = []


def terminal_stdout() -> TextIO:
    """Where our own lines go: the stdout from before any capture."""
    return _active[0].stdout if _active else sys.stdout


def terminal_stderr() -> TextIO:
    """Where our own progress and warnings go: the stderr from before any capture."""
    return _active[0].stderr if _active else sys.stderr


class LogStream(io.TextIOBase):
    """A text stream into a log file: ANSI codes removed, and a line redrawn with ``\\r`` (a progress bar)
    written once, as it last stood."""

    def __init__(self, file: TextIO | None = None) -> None:
        super().__init__()
        self._file = file
        self._held: list[str] = []  # lines written before start() gives the file
        self._line = ""
        self._redraw = False  # a \r was seen: the next text replaces the line

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        for part in _CONTROL.split(ANSI.sub("", text)):
            if part == "\n":
                self._put(self._line)
                self._line, self._redraw = "", False
            elif part == "\r":
                self._redraw = True
            elif part:
                self._line = part if self._redraw else self._line + part
                self._redraw = False
        return len(text)

    def _put(self, line: str) -> None:
        if self._file is None:
            self._held.append(line)
        else:
            self._file.write(line + "\n")

    def start(self, file: TextIO, header: str) -> None:
        self._file = file
        for line in [header, *self._held]:
            self._put(line)
        self._held.clear()

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._line:
            self._put(self._line)
            self._line = ""
        self.flush()
        super().close()


def _stream_handlers() -> list[logging.StreamHandler]:
    loggers = [logging.getLogger()] + [
        lg for lg in list(logging.Logger.manager.loggerDict.values()) if isinstance(lg, logging.Logger)
    ]
    found = {
        id(h): h
        for lg in loggers
        for h in lg.handlers
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
    }
    return list(found.values())


def _point(handler: logging.StreamHandler, stream: TextIO) -> None:
    """``handler.setStream`` without its flush of the old stream, which may be closed (a pytest capture)."""
    handler.acquire()
    try:
        handler.stream = stream
    finally:
        handler.release()


def begin_log() -> None:
    """From here on the captured output is kept: the log file is created (with what was held so far) and
    our line naming it printed. Until then (a ``defer``red capture) it is held, and dropped if the capture
    ends first: a run refused before its real work leaves no log behind."""
    if _active:
        _active[0].begin()


@contextmanager
def third_party_output(
    log: Path, what: str = "transformers and ModelOpt output", *, defer: bool = False
) -> Iterator[Path]:
    """Send stdout, stderr, logging handlers on them, ``warnings`` and tqdm bars to ``log`` (appended);
    print one line naming it. With ``defer``, both wait for ``begin_log()``. Yields the log's path (the
    outer capture's, when nested)."""
    if _active:
        yield _active[0].path
        return
    out, err = sys.stdout, sys.stderr
    terminal = {id(s) for s in (out, err, sys.__stdout__, sys.__stderr__) if s is not None}
    stream = LogStream()
    capture = _Capture(Path(log), out, err, stream, what)
    moved = [(h, h.stream) for h in _stream_handlers() if id(h.stream) in terminal]
    for handler, _ in moved:
        _point(handler, stream)
    _active.append(capture)
    sys.stdout, sys.stderr = stream, stream
    try:
        if not defer:
            capture.begin()
        yield capture.path
    finally:
        sys.stdout, sys.stderr = out, err
        _active.pop()
        for handler, before in moved:
            _point(handler, before)
        # a logger first configured during the capture (transformers imported inside it) kept our stream
        for handler in _stream_handlers():
            if handler.stream is stream:
                _point(handler, err)
        stream.close()
        if capture.file is not None:
            capture.file.close()
