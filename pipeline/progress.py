"""Progress of a long step: bytes done of a known total, rate and ETA, on stderr.

On a terminal it redraws one line; in a log (not a TTY) it prints a line at most every
``log_every`` seconds, so an eight-hour run leaves a readable trail rather than megabytes of updates.
While transformers/ModelOpt output is captured to a log (pipeline/console.py) it stays on the terminal.
"""

from __future__ import annotations

import threading
import time
from typing import TextIO

from pipeline.console import terminal_stderr

GB = 1e9


def human_seconds(s: float) -> str:
    s = round(s)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s" if m else f"{sec}s"


class Progress:
    def __init__(
        self,
        label: str,
        total_bytes: int,
        *,
        stream: TextIO | None = None,
        enabled: bool = True,
        redraw_every: float = 0.5,
        log_every: float = 30.0,
    ) -> None:
        self.label, self.total = label, max(int(total_bytes), 1)
        self.stream = stream if stream is not None else terminal_stderr()
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = redraw_every if self.tty else log_every
        self.done = 0
        self.start = time.perf_counter()
        self._last = 0.0
        self._lock = threading.Lock()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def rate(self) -> float:
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    def line(self, note: str = "") -> str:
        rate = self.rate()
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta_text = human_seconds(eta) if eta != float("inf") else "?"
        pct = 100 * self.done / self.total
        text = (
            f"[{self.label}] {self.done / GB:7.2f}/{self.total / GB:.2f} GB {pct:5.1f}%  "
            f"{rate / GB:5.2f} GB/s  ETA {eta_text}"
        )
        return f"{text}  {note}" if note else text

    def advance(self, nbytes: int, note: str = "") -> None:
        with self._lock:
            self.done += int(nbytes)
            now = time.perf_counter()
            if not self.enabled or now - self._last < self.every:
                return
            self._last = now
            self._emit(self.line(note))

    def message(self, text: str) -> None:
        if self.enabled:
            with self._lock:
                self._emit(text, newline=True)

    def _emit(self, text: str, newline: bool = False) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + text + ("\n" if newline else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\r\033[K" + self.line() + "\n")
            self.stream.flush()
