"""Ctrl-C (SIGINT) mid-run, then --resume: `dsv4 dequant` and `dsv4 convert` as real processes. The
interrupted process must end promptly although a worker thread is stuck in a tensor, exit 130, print one
line (no traceback) that says what is kept and to rerun with --resume, leave only the journal and finished
shards; the resumed run's output equals an uninterrupted run's, byte for byte. Slow tier: each starts a
fresh interpreter."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from harness.checkpoints import tree_digest
from pipeline.checkpoint import INDEX_NAME, JOURNAL_NAME
from pipeline.cli import main as dsv4

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PROMPT_S = 60  # the stuck worker sleeps 600 s: an exit within this proves nobody waited for it

# argv: step, input, output, ready-file, victim key, shard GiB. The victim's conversion blocks in a worker
# thread; main() is called without argv, as the `dsv4` script calls it.
CHILD = textwrap.dedent(
    """
    import pathlib, sys, time
    step, src, dst, ready, victim, gib = sys.argv[1:7]
    if step == "dequant":
        import pipeline.dequant as m
        real = m.convert
        def slow(source, device):
            if source.weight.key == victim:
                pathlib.Path(ready).touch()
                time.sleep(600)
            return real(source, device)
        m.convert = slow
    else:
        import pipeline.convert.produce as m
        real = m.run_job
        def slow(job, stats, device):
            if victim in job.outputs:
                pathlib.Path(ready).touch()
                time.sleep(600)
            return real(job, stats, device)
        m.run_job = slow
    from pipeline.cli import main
    sys.argv = ["dsv4", step, src, dst, "--quiet", "--max-shard-gib", gib, "--workers", "1"]
    sys.exit(main())
    """
)


def _restore_sigint() -> None:  # pragma: no cover - runs in the child before exec
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # an ignored SIGINT would make Python ignore it too


def _victim(reference: Path) -> tuple[list[str], str]:
    """The reference's shard names and the first key of its second-to-last shard: blocking there leaves
    all shards before it finished."""
    weight_map = json.loads((reference / INDEX_NAME).read_text())["weight_map"]
    shards = sorted(set(weight_map.values()))
    assert len(shards) >= 3
    return shards, min(k for k, s in weight_map.items() if s == shards[-2])


def _interrupt_when_ready(step: str, src: Path, out: Path, victim: str, gib: str) -> tuple[int, str, float]:
    ready = out.with_name("ready")
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, step, str(src), str(out), str(ready), victim, gib],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_restore_sigint,
    )
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None, f"the step ended before reaching {victim}: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "the step never reached the chosen tensor"
            time.sleep(0.05)
        time.sleep(0.2)  # let the writer reach its wait for the stuck tensor
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=PROMPT_S)
        return proc.returncode, err, time.monotonic() - sent
    finally:
        proc.kill()
        proc.wait()


def _check_interrupted(out: Path, shards: list[str], rc: int, err: str) -> None:
    assert rc == 130, err
    assert err.strip().splitlines() == [
        f"dsv4: interrupted: {len(shards) - 2} of {len(shards)} shards of {out} are finished and kept; "
        "rerun the same command with --resume to continue"
    ], err
    # on disk: the journal and the finished shards, nothing else (no partial, no lock, no index)
    assert sorted(p.name for p in out.iterdir()) == sorted([JOURNAL_NAME, *shards[:-2]])
    journal = json.loads((out / JOURNAL_NAME).read_text())
    assert journal["complete"] is False and sorted(journal["finished"]) == shards[:-2]


def test_dequant_sigint_then_resume_is_byte_identical(tiny_release, tmp_path):
    from pipeline.dequant import dequantize_checkpoint

    gib = "0.001"
    reference = tmp_path / "reference"
    dequantize_checkpoint(tiny_release, reference, progress=False, max_shard_bytes=int(float(gib) * 1024**3))
    shards, victim = _victim(reference)
    out = tmp_path / "out"
    rc, err, _ = _interrupt_when_ready("dequant", tiny_release, out, victim, gib)
    _check_interrupted(out, shards, rc, err)
    assert dsv4(["dequant", str(tiny_release), str(out), "--quiet", "--max-shard-gib", gib, "--resume"]) == 0
    assert tree_digest(out) == tree_digest(reference)


def test_convert_sigint_then_resume_is_byte_identical(exports, tmp_path):
    from pipeline.convert import convert_checkpoint

    gib = "0.0003"
    export = exports("full", "H", "separate")
    before = tree_digest(export)
    reference = tmp_path / "reference"
    convert_checkpoint(export, reference, progress=False, max_shard_bytes=int(float(gib) * 1024**3))
    shards, victim = _victim(reference)
    out = tmp_path / "out"
    rc, err, _ = _interrupt_when_ready("convert", export, out, victim, gib)
    _check_interrupted(out, shards, rc, err)
    assert dsv4(["convert", str(export), str(out), "--quiet", "--max-shard-gib", gib, "--resume"]) == 0
    assert tree_digest(out) == tree_digest(reference)
    assert tree_digest(export) == before
