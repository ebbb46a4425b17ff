"""Output a person reads (issue 14): `dsv4 quantize` piped to a file holds our lines only, no ANSI codes and
no \\r; what transformers and ModelOpt print (progress bars, version warnings, "Inserted N quantizers")
goes to the log file our one line names (pipeline/console.py)."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.console import LogStream, terminal_stdout, third_party_output

pytestmark = [pytest.mark.tiny, pytest.mark.quant]

ROOT = Path(__file__).resolve().parents[2]
THIRD_PARTY = (
    "Loading weights",
    "Writing model shards",
    "is not tested",
    "Inserted",
    "Registered",
    "Detected fused MoE",
    "torch_dtype",
    "site-packages",
    "Warning",
)


def test_quantize_piped_prints_our_lines_only_and_logs_the_rest(micro_bf16, tmp_path):
    dst = tmp_path / "nvfp4"
    argv = [
        "quantize",
        str(micro_bf16),
        str(dst),
        "--recipe",
        "experts",
        "--calib-size",
        "4",
        "--calib-seq",
        "16",
    ]
    run = subprocess.run(
        [sys.executable, "-m", "pipeline", *argv],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,  # pipes: neither stream is a TTY
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    output = run.stdout + run.stderr
    assert "\x1b[" not in output and "\r" not in output, output
    for text in THIRD_PARTY:
        assert text not in output, f"{text!r} in the output:\n{output}"
    log = tmp_path / "nvfp4.log"
    assert f"(transformers and ModelOpt output: {log})" in run.stdout
    assert run.stdout.count("\n") == 2, run.stdout  # that line and the summary
    held = log.read_text()
    assert "Loading weights" in held and "Writing model shards" in held and "Inserted" in held, held
    assert "\x1b[" not in held and "\r" not in held, held  # a redrawn bar is logged once, as it ended


def test_log_stream_keeps_a_redrawn_line_as_it_ended_without_ansi():
    file = io.StringIO()
    stream = LogStream(file)
    stream.write("\rbar   0%\rbar  50%")
    stream.write("\rbar 100%\n\x1b[1mbold\x1b[0m\r\nlast")
    stream.close()
    assert file.getvalue() == "bar 100%\nbold\nlast\n"


def test_capture_restores_streams_and_handlers_and_nests(tmp_path, capsys):
    before_out, before_err = sys.stdout, sys.stderr
    with third_party_output(tmp_path / "a.log") as log:
        late = logging.getLogger("dsv4-test-configured-during-capture")
        late.addHandler(logging.StreamHandler(sys.stderr))  # as transformers does when first imported
        late.warning("from a library logger")
        print("from a library print")
        print("ours", file=terminal_stdout())
        with third_party_output(tmp_path / "b.log") as inner:
            print("nested library print")
    assert inner == log and not (tmp_path / "b.log").exists()
    assert sys.stdout is before_out and sys.stderr is before_err
    assert late.handlers[0].stream is sys.stderr  # not left pointing at the closed log
    out = capsys.readouterr().out
    assert f"(transformers and ModelOpt output: {log})" in out and "ours" in out and "library" not in out
    held = log.read_text()
    assert "from a library logger" in held and "from a library print" in held and "nested" in held
    late.handlers.clear()
