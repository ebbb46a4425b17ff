"""`dsv4 serve`'s run path end to end against a fake `vllm` program (harness/fake_vllm.py): start, health
wait, smoke request, clean stop, a crashed server, a hung one, --keep-running. Slow tier: each starts
and stops server subprocesses (seconds), so they stay out of the `-m unit` laptop loop; the rest of
serve's tests are in tests/serve/test_serve.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import fake_vllm
from harness import preflight as P
from pipeline import children
from pipeline import serve as S
from pipeline.errors import DsV4Error
from tests.cli.test_signals import gone, wait_for_file
from tests.serve.test_serve import ROOT, cli, free_port, make

pytestmark = pytest.mark.slow


@pytest.fixture
def ckpt(converted) -> Path:
    """The micro model's experts-recipe export through `dsv4 convert`. Do not mutate."""
    return converted("experts").out_dir


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tokenizer")
    (d / "tokenizer.json").write_text("{}")
    return d


@pytest.fixture
def fake_vllm_bin(tmp_path, monkeypatch) -> tuple[Path, Path]:
    exe = tmp_path / "bin" / "vllm"
    exe.parent.mkdir()
    exe.write_text(
        f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(ROOT)!r})\n"
        "from harness.fake_vllm import main\nsys.exit(main())\n"
    )
    exe.chmod(0o755)
    record = tmp_path / "record.json"
    monkeypatch.setenv("FAKE_VLLM_RECORD", str(record))
    return exe, record


def _run_argv(ckpt, tokenizer_dir, exe, tmp_path, *more) -> list[str]:
    return [
        str(ckpt),
        "--tp",
        "4",
        "--tokenizer",
        str(tokenizer_dir),
        "--port",
        str(free_port()),
        "--vllm-bin",
        str(exe),
        "--log-file",
        str(tmp_path / "server.log"),
        "--health-timeout",
        "30",
        *more,
    ]


def test_run_starts_waits_smokes_and_stops(ckpt, tokenizer_dir, fake_vllm_bin, tmp_path, capsys):
    exe, record = fake_vllm_bin
    argv = _run_argv(ckpt, tokenizer_dir, exe, tmp_path, "--max-tokens", "7")
    assert cli(argv) == 0
    out = capsys.readouterr().out
    seen = json.loads(record.read_text())
    port = int(argv[argv.index("--port") + 1])
    s = make(ckpt, tokenizer_dir, port=port)
    assert seen["argv"] == ["serve", *S.vllm_args(s)]
    assert seen["requests"] == [S.smoke_body(ckpt.name, S.SMOKE_PROMPT, 7)]
    assert seen["stopped_by"] == "SIGTERM"
    assert (
        seen["sigint"] == "default"
    )  # even when this test runs with SIGINT ignored (tests/cli/test_signals.py)
    assert f"completion (greedy, 7 tokens, finish_reason length): {fake_vllm.CANNED_TEXT!r}" in out
    assert "tokens/s" in out and "server stopped (exit status 0)" in out
    with pytest.raises(ProcessLookupError):
        os.kill(seen["pid"], 0)
    assert "fake-vllm: listening" in (tmp_path / "server.log").read_text()


def test_run_reports_a_crashed_server_with_its_log(ckpt, tokenizer_dir, fake_vllm_bin, tmp_path, monkeypatch):
    exe, _ = fake_vllm_bin
    monkeypatch.setenv("FAKE_VLLM_MODE", "crash")
    with pytest.raises(DsV4Error, match=r"exited with status 1(.|\n)*KeyError: 'layers.0.attn.norm.weight'"):
        cli(_run_argv(ckpt, tokenizer_dir, exe, tmp_path))


def test_run_times_out_and_stops_the_server(ckpt, tokenizer_dir, fake_vllm_bin, tmp_path, monkeypatch):
    exe, record = fake_vllm_bin
    monkeypatch.setenv("FAKE_VLLM_MODE", "hang")
    argv = _run_argv(ckpt, tokenizer_dir, exe, tmp_path)
    argv[argv.index("--health-timeout") + 1] = "0.5"
    with pytest.raises(DsV4Error, match=r"did not answer 200 within 0.5 s(.|\n)*fake-vllm: serve"):
        cli(argv)
    assert json.loads(record.read_text())["stopped_by"] == "SIGTERM"


def test_run_keep_running_leaves_the_server_up(ckpt, tokenizer_dir, fake_vllm_bin, tmp_path, capsys):
    exe, record = fake_vllm_bin
    argv = _run_argv(ckpt, tokenizer_dir, exe, tmp_path, "--keep-running")
    assert cli(argv) == 0
    out = capsys.readouterr().out
    pid = json.loads(record.read_text())["pid"]
    try:
        assert f"left running: pid {pid}" in out
        os.kill(pid, 0)  # still there
        assert S._get(f"http://127.0.0.1:{argv[argv.index('--port') + 1]}/health", 5) == 200
    finally:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG) != (0, 0):
                    break
            except ChildProcessError:  # already reaped (subprocess cleans up abandoned children)
                break
            time.sleep(0.05)


def test_an_interrupted_serve_step_stops_its_server(
    ckpt, tokenizer_dir, fake_vllm_bin, tmp_path, monkeypatch
):
    """The canary's serve step at its timeout: SIGINT reaches `dsv4 serve` (its finally stops the vLLM
    server it started in a session of its own, with SIGTERM), and nothing is left running."""
    exe, record = fake_vllm_bin
    monkeypatch.setenv("FAKE_VLLM_MODE", "hang")
    argv = [sys.executable, "-m", "pipeline", "serve", *_run_argv(ckpt, tokenizer_dir, exe, tmp_path)]
    argv[argv.index("--health-timeout") + 1] = "300"
    proc = children.popen(
        argv, cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        server = json.loads(wait_for_file(record))["pid"]
    except AssertionError:
        proc.kill()
        raise
    t0 = time.monotonic()
    P.interrupt_step(proc, grace=30)
    out = proc.stdout.read().decode(errors="replace")
    seen = json.loads(record.read_text())
    assert time.monotonic() - t0 < 30, out  # stopped gracefully, not killed at the end of the grace period
    assert seen["stopped_by"] == "SIGTERM" and "server stopped" in out, out
    assert seen["sigint"] == "default"
    assert gone(server)
