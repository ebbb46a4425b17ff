"""Stopping children when this process was started with SIGINT ignored (``nohup pytest -m b200 ... &``,
``&`` in a non-interactive script, some CI runners), and killing everything a step started.

CPython keeps an inherited SIG_IGN for SIGINT, and fork/exec pass it on, so without pipeline.children a
canary step ignores the SIGINT meant to stop it gracefully, and `dsv4 serve` starts vLLM ignoring it too.
``test_signal_sensitive_tests_pass_with_sigint_ignored`` re-runs the tests that depend on it in a pytest
started with SIGINT ignored; the others check that a killed step leaves no process behind, its
own-session children included. Slow tier: subprocesses, seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import preflight as P
from pipeline import children

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
IGNORED_RUN = "DSV4_TEST_SIGINT_IGNORED"  # set in the inner run, which starts with SIGINT ignored

# The tests whose outcome depends on the SIGINT disposition this process inherited.
SIGNAL_SENSITIVE = (
    "tests/cli/test_signals.py::test_the_inner_run_inherited_sigint_ignored",
    "tests/cli/test_signals.py::test_popen_gives_the_child_sigint_at_its_default",
    "tests/cli/test_signals.py::test_a_killed_step_leaves_no_process_behind[graceful]",
    "tests/preflight/test_preflight_full.py::test_run_step_logs_and_reports_exit_status_and_timeouts",
    "tests/serve/test_serve_run.py::test_run_starts_waits_smokes_and_stops",
    "tests/serve/test_serve_run.py::test_an_interrupted_serve_step_stops_its_server",
)

# exec'd with SIGINT ignored: what `nohup` / a background job in a script does to the pytest it starts
START_IGNORING_SIGINT = (
    "import os, signal, sys\n"
    "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
    "os.execv(sys.executable, [sys.executable, '-m', 'pytest', *sys.argv[1:]])\n"
)


def gone(pid: int, within: float = 10.0) -> bool:
    """True once ``pid`` is not running: absent, or a zombie that nobody reaped yet (a container's init
    may never reap re-parented orphans)."""
    deadline = time.monotonic() + within
    while True:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return True
        if stat[stat.rindex(")") + 2] in "ZX":
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def wait_for_file(path: Path, within: float = 60.0) -> str:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text()
        time.sleep(0.05)
    raise AssertionError(f"{path} was not written within {within} s")


def test_signal_sensitive_tests_pass_with_sigint_ignored(tmp_path):
    if os.environ.get(IGNORED_RUN):
        pytest.skip("this is the inner run")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST", "PYTEST_CURRENT"))}
    env[IGNORED_RUN] = "1"
    argv = [*SIGNAL_SENSITIVE, "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "--basetemp", str(tmp_path)]
    done = subprocess.run(
        [sys.executable, "-c", START_IGNORING_SIGINT, *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert " passed" in out and "failed" not in out, out[-4000:]


def test_the_inner_run_inherited_sigint_ignored():
    if not os.environ.get(IGNORED_RUN):
        pytest.skip("runs in the inner run of test_signal_sensitive_tests_pass_with_sigint_ignored")
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    assert not children.sigint_reaches_children()


def test_popen_gives_the_child_sigint_at_its_default(tmp_path):
    probe = "import signal; print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN)"
    proc = children.popen([sys.executable, "-c", probe], stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    out, _ = proc.communicate(timeout=60)
    assert out.strip() == "False"


def test_popen_keeps_popens_error_for_a_missing_program(tmp_path):
    with pytest.raises(FileNotFoundError):
        children.popen([str(tmp_path / "no-such-program")])
    with pytest.raises(FileNotFoundError):
        children.popen(["no-such-program-dsv4"], env={"PATH": str(tmp_path)})


# A step that starts a child in a session of its own (as `dsv4 serve` starts vLLM), writes its pid to
# argv[1], then waits; argv[2] "stubborn" makes it ignore SIGINT, as a hung step may.
STEP_WITH_OWN_SESSION_CHILD = (
    "import pathlib, signal, subprocess, sys, time\n"
    "if sys.argv[2] == 'stubborn':\n"
    "    signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True)\n"
    "pathlib.Path(sys.argv[1]).write_text(str(child.pid))\n"
    "time.sleep(120)\n"
)


@pytest.mark.parametrize("behaviour", ["stubborn", "graceful"])
def test_a_killed_step_leaves_no_process_behind(tmp_path, behaviour):
    """stubborn: the step ignores SIGINT and is killed after the grace period; graceful: it exits on
    SIGINT and orphans its own-session child. Either way that child goes too."""
    pid_file = tmp_path / "child.pid"
    argv = [sys.executable, "-c", STEP_WITH_OWN_SESSION_CHILD, str(pid_file), behaviour]
    step = P.CanaryStep("own-session", argv, 2.0)  # ample to start; the child is written first
    result = P.run_step(step, tmp_path / "logs", grace=1.0)
    child = int(pid_file.read_text())
    assert result.returncode == -1 and result.seconds < 10
    assert ("KeyboardInterrupt" in result.tail) == (behaviour == "graceful")
    assert gone(child), f"own-session child {child} of the {behaviour} step outlived it"


def test_kill_tree_takes_descendants_started_after_the_snapshot(tmp_path):
    """kill_tree walks the tree when it kills: a child started after the caller's snapshot goes too."""
    code = (
        "import pathlib, subprocess, sys, time\n"
        "time.sleep(0.3)\n"
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True)\n"
        "pathlib.Path(sys.argv[1]).write_text(str(c.pid))\n"
        "time.sleep(120)\n"
    )
    pid_file = tmp_path / "child.pid"
    proc = children.popen([sys.executable, "-c", code, str(pid_file)], start_new_session=True)
    root = children.identify(proc.pid)
    assert root is not None and children.tree([root]) == [root]  # the snapshot: the step alone
    child = int(wait_for_file(pid_file))
    killed = children.kill_tree([root])
    assert {p.pid for p in killed} == {proc.pid, child}
    assert proc.wait(timeout=10) == -signal.SIGKILL
    assert gone(child)
