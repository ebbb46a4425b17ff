"""A `dsv4 calibrate` that stops, fails or is killed mid-run resumes at its first uncommitted layer, and
its AMAX is byte-identical to an uninterrupted run's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import pipeline.calibrate.workdir as workdir
from pipeline.calibrate import CalibrateOptions, calibrate_release
from pipeline.cli import main as dsv4
from pipeline.errors import DsV4Error

pytestmark = [pytest.mark.tiny, pytest.mark.quant]

ROOT = Path(__file__).resolve().parents[2]
CALIB = ["--samples", "4", "--seq-len", "256", "--batch", "2", "--device", "cpu", "--quiet"]


def options(**kw) -> CalibrateOptions:
    return CalibrateOptions(samples=4, seq_len=256, batch=2, device="cpu", progress=False, **kw)


@pytest.fixture(scope="module")
def uninterrupted(micro_release: Path, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    amax = tmp_path_factory.mktemp("uninterrupted") / "amax.safetensors"
    calibrate_release(micro_release, amax, options())
    return amax.read_bytes()


def test_stopped_then_failed_then_resumed_is_byte_identical(
    micro_release, uninterrupted, tmp_path, monkeypatch
):
    amax = tmp_path / "amax.safetensors"
    work = tmp_path / ".amax.safetensors.work"
    first = calibrate_release(micro_release, amax, options(stop_after=1))
    assert not first.complete and [r.layer for r in first.layers] == [0] and not amax.exists()

    # then a failure inside layer 2's commit: its outputs written, its amax not
    real = workdir.write_bytes_atomic

    def fail_on_layer_2(path, data):
        if path.name == "layer-0002.safetensors":
            raise DsV4Error(f"{path}: injected failure")
        real(path, data)

    monkeypatch.setattr(workdir, "write_bytes_atomic", fail_on_layer_2)
    with pytest.raises(DsV4Error, match="injected failure"):
        calibrate_release(micro_release, amax, options())
    monkeypatch.undo()
    assert sorted(p.name for p in work.iterdir() if not p.name.startswith(".")) == [
        "hidden-0002.safetensors",
        "hidden-0003.safetensors",
        "layer-0000.safetensors",
        "layer-0001.safetensors",
        "manifest.json",
    ]

    last = calibrate_release(micro_release, amax, options())
    assert last.complete and last.kept_layers == 2 and [r.layer for r in last.layers] == [2, 3]
    assert amax.read_bytes() == uninterrupted
    assert not work.exists()


def test_a_resume_with_another_recipe_is_refused_until_restart(
    micro_release, uninterrupted, tmp_path, capsys
):
    amax = tmp_path / "amax.safetensors"
    calibrate_release(micro_release, amax, options(stop_after=1))
    assert dsv4(["calibrate", str(micro_release), str(amax), "--recipe", "full", *CALIB]) == 2
    err = capsys.readouterr().err
    assert "recipe: was 'experts', now 'full'" in err and "--restart" in err and err.count("\n") == 1
    assert dsv4(["calibrate", str(micro_release), str(amax), *CALIB, "--restart"]) == 0
    assert amax.read_bytes() == uninterrupted


CHILD = textwrap.dedent(
    """
    import pathlib, sys, time
    import pipeline.calibrate.loop as loop
    real = loop.calibrate_layer
    def blocking(index, *args):
        if index == 2:
            pathlib.Path(sys.argv[1]).touch()
            time.sleep(300)
        return real(index, *args)
    loop.calibrate_layer = blocking
    from pipeline.cli import main
    sys.exit(main(sys.argv[2:]))
    """
)


def test_killed_in_layer_2_then_rerun_is_byte_identical(micro_release, uninterrupted, tmp_path, capsys):
    amax, marker = tmp_path / "amax.safetensors", tmp_path / "in-layer-2"
    argv = ["calibrate", str(micro_release), str(amax), *CALIB]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(marker), *argv], cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert child.poll() is None, "dsv4 calibrate exited before reaching layer 2"
            assert time.monotonic() < deadline, "dsv4 calibrate never reached layer 2"
            time.sleep(0.1)
        # while it runs, a second run on the same AMAX is refused (it would share the work folder)
        assert dsv4(argv) == 2
        assert "another dsv4 run is writing" in capsys.readouterr().err
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert not amax.exists()
    assert dsv4(argv) == 0
    out = capsys.readouterr().out
    assert "2 kept from the interrupted run" in out
    assert amax.read_bytes() == uninterrupted
