"""Waiting for the server: ``GET /health`` polled until vLLM answers 200 (once its engine is up), with a
progress line now and then; the server's log tail when it exits first or the wait times out."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from pipeline.errors import DsV4Error
from pipeline.serve.client import get_status
from pipeline.serve.process import last_line, log_tail
from pipeline.serve.settings import DEFAULT_HEALTH_TIMEOUT


def wait_for_health(
    url: str,
    proc,
    log_path: Path,
    *,
    timeout: float = DEFAULT_HEALTH_TIMEOUT,
    interval: float = 2.0,
    progress_every: float = 30.0,
    out: TextIO | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> float:
    """Poll GET {url}/health until it answers 200; the seconds that took. DsV4Error with the server's
    log tail if the process exits first or ``timeout`` passes."""
    start = last_report = clock()
    pause = min(interval, 0.25)  # short at first (a server that dies at once is reported at once)
    while True:
        elapsed = clock() - start
        code = proc.poll()
        if code is not None:
            raise DsV4Error(
                f"the server exited with status {code} after {elapsed:.0f} s, before {url}/health answered; "
                f"last lines of {log_path}:\n{log_tail(log_path)}"
            )
        if get_status(f"{url}/health", timeout=min(10.0, max(interval, 1.0))) == 200:
            return elapsed
        if elapsed >= timeout:
            raise DsV4Error(
                f"{url}/health did not answer 200 within {timeout:g} s; last lines of {log_path}:\n"
                f"{log_tail(log_path)}"
            )
        if out is not None and clock() - last_report >= progress_every:
            last_report = clock()
            print(
                f"waiting for {url}/health: {elapsed:.0f} s of {timeout:g} s; log: {last_line(log_path)}",
                file=out,
                flush=True,
            )
        sleep(pause)
        pause = min(interval, pause * 2)
