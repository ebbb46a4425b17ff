"""kill -9 mid-shard, then resume: byte-identical to an uninterrupted run, for the writer and for
dsv4 dequant. Slow tier: each starts a fresh interpreter (seconds here), so they stay out of the
`-m unit` laptop loop; `tox -e unit` and CI run them."""

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
from pipeline.checkpoint import JOURNAL_NAME, LOCK_NAME
from pipeline.checkpoint.writer import write_checkpoint
from pipeline.cli import main as dsv4
from pipeline.dequant import dequantize_checkpoint
from pipeline.errors import DsV4Error
from tests.checkpoint.test_checkpoint_writer import (
    REPO,
    demo_plan,
    file_bytes,
    looks_complete,
    produce,
    reference_output,
)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
__all__ = ["reference_output"]  # the fixture, imported for the writer's test


def test_kill_mid_shard_then_resume_is_byte_identical(tmp_path, reference_output):
    out, marker = tmp_path / "out", tmp_path / "blocked"
    code = (
        f"import tests.checkpoint.test_checkpoint_writer as m; m._child_main({str(out)!r}, {str(marker)!r})"
    )
    child = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert child.poll() is None, "the writer subprocess exited before reaching the blocking key"
            assert time.monotonic() < deadline, "the writer subprocess never reached the blocking key"
            time.sleep(0.05)
        partial = out / ".model-00002-of-00003.safetensors.partial"
        assert partial.stat().st_size > len(
            demo_plan().shards[1].header_bytes
        )  # header + two tensors written
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    # Killed mid-shard 2: shard 1 final, shard 2 only as a partial, nothing complete-looking; the lock
    # file stays (the kernel released its flock with the process) and does not stand in --resume's way.
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([JOURNAL_NAME, LOCK_NAME, "model-00001-of-00003.safetensors", partial.name])
    assert looks_complete(out, demo_plan()) == []

    with pytest.raises(DsV4Error, match="not empty"):
        write_checkpoint(demo_plan(), out, produce)
    result = write_checkpoint(demo_plan(), out, produce, resume=True)
    assert result.skipped == ["model-00001-of-00003.safetensors"]
    assert result.written == ["model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"]
    assert file_bytes(out) == reference_output


KILLER = textwrap.dedent(
    """
    import sys, time, pathlib
    import pipeline.dequant as d
    real = d.convert
    ready = pathlib.Path(sys.argv[3])
    def slow(src, device):
        if src.weight.key == sys.argv[4]:
            ready.touch()
            time.sleep(600)
        return real(src, device)
    d.convert = slow
    from pipeline.cli import main
    sys.exit(main(["dequant", sys.argv[1], sys.argv[2], "--quiet", "--max-shard-gib", "0.001", "--workers", "1"]))
    """
)


def _victim(reference: Path) -> tuple[list[str], str]:
    """(the reference run's shard names, the first key of its second-to-last shard): the tensor to
    block on, so that the kill lands with a shard finished before it and one half written."""
    shards = sorted(p.name for p in reference.glob("*.safetensors"))
    assert len(shards) >= 3
    index = json.loads((reference / "model.safetensors.index.json").read_text())["weight_map"]
    return shards, sorted(k for k, shard in index.items() if shard == shards[-2])[0]


def _kill_9_when_ready(killer: str, args: list[str], ready: Path) -> None:
    """Run ``killer`` (a python -c script that touches ``ready`` and blocks) and SIGKILL it once it is."""
    proc = subprocess.Popen(
        [sys.executable, "-c", killer, *args], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert proc.poll() is None, "the step ended before reaching the chosen tensor"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_kill_9_mid_run_then_resume_is_byte_identical(tiny_release, tmp_path):
    dequantize_checkpoint(
        tiny_release, tmp_path / "reference", progress=False, max_shard_bytes=int(0.001 * 1024**3)
    )
    shards, victim = _victim(tmp_path / "reference")
    out, ready = tmp_path / "out", tmp_path / "ready"
    _kill_9_when_ready(KILLER, [str(tiny_release), str(out), str(ready), victim], ready)
    # nothing looks complete: no index, the victim's shard not under its final name
    assert not (out / "model.safetensors.index.json").exists()
    assert not (out / shards[-2]).exists()
    finished = json.loads((out / JOURNAL_NAME).read_text())["finished"]
    assert shards[0] in finished and (out / shards[0]).exists()  # finished before the kill: kept
    assert (
        dsv4(["dequant", str(tiny_release), str(out), "--quiet", "--max-shard-gib", "0.001"]) == 2
    )  # not empty
    assert (
        dsv4(["dequant", str(tiny_release), str(out), "--quiet", "--max-shard-gib", "0.001", "--resume"]) == 0
    )
    assert tree_digest(out) == tree_digest(tmp_path / "reference")


CONVERT_KILLER = textwrap.dedent(
    """
    import sys, time, pathlib
    import pipeline.convert.produce as c
    real = c.run_job
    ready = pathlib.Path(sys.argv[3])
    def slow(job, stats, device):
        if sys.argv[4] in job.outputs:
            ready.touch()
            time.sleep(600)
        return real(job, stats, device)
    c.run_job = slow
    from pipeline.cli import main
    sys.exit(main(["convert", sys.argv[1], sys.argv[2], "--quiet", "--max-shard-gib", "0.0003", "--workers", "1"]))
    """
)


def test_convert_kill_9_mid_run_then_resume_is_byte_identical(exports, tmp_path):
    """dsv4 convert killed (SIGKILL) while producing a tensor of its second-to-last shard, then --resume:
    the output equals an uninterrupted run's, journal included, and the export is untouched."""
    from pipeline.convert import convert_checkpoint

    export = exports("full", "H", "separate")  # every action, the w1/w3 unification included
    before = tree_digest(export)
    max_bytes = int(0.0003 * 1024**3)
    convert_checkpoint(export, tmp_path / "reference", progress=False, max_shard_bytes=max_bytes)
    shards, victim = _victim(tmp_path / "reference")
    out, ready = tmp_path / "out", tmp_path / "ready"
    _kill_9_when_ready(CONVERT_KILLER, [str(export), str(out), str(ready), victim], ready)
    assert not (out / "model.safetensors.index.json").exists()
    assert not (out / shards[-2]).exists()
    assert shards[0] in json.loads((out / JOURNAL_NAME).read_text())["finished"]
    args = ["convert", str(export), str(out), "--quiet", "--max-shard-gib", "0.0003"]
    assert dsv4(args) == 2  # not empty: refuses without --resume
    assert dsv4([*args, "--resume"]) == 0
    assert tree_digest(out) == tree_digest(tmp_path / "reference")
    assert tree_digest(export) == before
