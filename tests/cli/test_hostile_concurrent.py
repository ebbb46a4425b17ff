"""Two runs into one output folder (issue 13, class 3), for every command that writes a checkpoint.

The first run is a real `dsv4` process, held at a chosen tensor of its second-to-last shard (a hook that
waits for the test's go-ahead on stdin), so it is caught mid-run at the same point every time: the lock
taken, the journal and the first shards written, a partial shard open, no index. It is then frozen
(SIGSTOP) while second runs go into the same folder (plain, plain through a symlink to it, --resume,
--overwrite, and another writer's --resume): each must be refused as harness.hostile.assert_refused_as_held
says (exit 2, one `dsv4: error:` line naming the folder and the holder's pid, no traceback, not a byte of
the first run's folder or of the inputs changed, the lock still the first run's). Thawed and let go, the
first run must finish with the bytes of an undisturbed run. A run killed with SIGKILL leaves its lock
file behind: --resume and --overwrite must treat it as stale, not as a holder. A reader (`dsv4 validate`)
looking at the folder mid-run must not call it a valid checkpoint. Slow tier: each case starts an
interpreter.
"""

from __future__ import annotations

import json
import shutil
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness import hostile as H
from harness.checkpoints import tree_digest
from pipeline import cli

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
needs_proc_locks = pytest.mark.skipif(
    not Path("/proc/locks").exists(), reason="needs /proc/locks (Linux) to see who holds a flock"
)

# argv: step, victim key, then the dsv4 argv. Producing the victim waits for a line on stdin (EOF too, so
# a test that died never leaves it waiting); "READY" on stdout says it got there.
CHILD = textwrap.dedent(
    """
    import sys
    step, victim, *argv = sys.argv[1:]
    def hold():
        print("READY", flush=True)
        sys.stdin.readline()
    if step == "dequant":
        import pipeline.dequant as m
        real = m.convert
        def slow(source, device):
            if source.weight.key == victim:
                hold()
            return real(source, device)
        m.convert = slow
    elif step == "convert":
        import pipeline.convert.produce as m
        real = m.run_job
        def slow(job, stats, device):
            if victim in job.outputs:
                hold()
            return real(job, stats, device)
        m.run_job = slow
    else:
        import pipeline.slice.step as m
        real = m.produce_tensor
        def slow(plan, key):
            if key == victim:
                hold()
            return real(plan, key)
        m.produce_tensor = slow
    from pipeline.cli import main
    sys.argv = ["dsv4", *argv]
    sys.exit(main())
    """
)


@dataclass(frozen=True)
class Writer:
    reads: str  # "release" or "export"
    argv: tuple[str, ...]  # {in}: its input, {out}: the output folder
    shard_gib: str  # small enough for several shards: the first run is caught with some finished


ON_CPU = ("--device", "cpu", "--workers", "1")
WRITERS: dict[str, Writer] = {
    "dequant": Writer("release", ("dequant", "{in}", "{out}", *ON_CPU), "0.001"),
    "convert": Writer("export", ("convert", "{in}", "{out}", *ON_CPU), "0.0003"),
    "slice": Writer("release", ("slice", "{in}", "{out}", "--layers", "2", "--experts", "2"), "0.0005"),
}
OTHER = {"dequant": "slice", "convert": "dequant", "slice": "dequant"}  # a second, different writer


def argv(name: str, inputs: dict[str, Path], out: Path, *extra: str) -> list[str]:
    writer = WRITERS[name]
    fill = {"{in}": str(inputs[writer.reads]), "{out}": str(out)}
    return [fill.get(a, a) for a in writer.argv] + ["--quiet", "--max-shard-gib", writer.shard_gib, *extra]


def test_every_command_with_resume_is_covered():
    """A new step that writes a checkpoint (the streaming options: --resume) must join WRITERS. `dsv4
    quantize` (no --resume: ModelOpt writes its export) needs the quant env: its two-run case is in
    tests/quantize/test_hostile_quantize.py."""
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    resumable = {
        name for name, p in sub.choices.items() if any("--resume" in a.option_strings for a in p._actions)
    }
    assert resumable == set(WRITERS)


@pytest.fixture
def inputs(tiny_release, exports, tmp_path) -> dict[str, Path]:
    """Private copies of what the writers read (the byte checks cover them too)."""
    return {
        "release": tiny_release,
        "export": H.copy_tree(exports("full", "H", "separate"), tmp_path / "export"),
    }


def reference(name: str, inputs: dict[str, Path], tmp_path: Path, capsys) -> tuple[dict[str, str], str]:
    """(tree digest of an undisturbed run, the key to hold the first run at: the first, by name, of the
    second-to-last shard, so that shards before it are finished and it is half written)."""
    ref = tmp_path / f"reference-{name}"
    outcome = H.run_dsv4(argv(name, inputs, ref), capsys)
    assert outcome.rc == 0, f"the undisturbed run failed\n{outcome.show()}"
    weight_map = json.loads((ref / H.INDEX).read_text())["weight_map"]
    shards = sorted(set(weight_map.values()))
    assert len(shards) >= 3, shards
    return tree_digest(ref), min(k for k, s in weight_map.items() if s == shards[-2])


@pytest.fixture
def first_runs():
    """name, victim, argv -> `dsv4 NAME ...` started as a process of its own, held at ``victim``."""
    runs: list[H.HeldRun] = []

    def start(name: str, victim: str, args: list[str]) -> H.HeldRun:
        runs.append(H.HeldRun(CHILD, [name, victim, *args], ROOT))
        return runs[-1]

    yield start
    for run in runs:
        run.close()


def caught_mid_run(run: H.HeldRun, out: Path) -> None:
    """The first run holds the lock and is mid-run: journal written, nothing complete."""
    assert H.flock_holders(out / H.LOCK) == {run.pid}
    holder = H.lock_holder(out)
    assert holder is not None and holder["pid"] == run.pid, holder
    journal = json.loads((out / H.JOURNAL).read_text())
    assert journal["finished"] and journal["complete"] is False
    assert H.looks_complete(out) is None


@needs_proc_locks
@pytest.mark.parametrize("name", list(WRITERS))
def test_second_run_into_a_folder_being_written_is_refused(name, inputs, tmp_path, first_runs, capsys):
    digest, victim = reference(name, inputs, tmp_path, capsys)
    out = (tmp_path / "out").resolve()
    first = first_runs(name, victim, argv(name, inputs, out))
    first.wait_ready()
    first.freeze()  # whatever changes in its folder from here on is the second run's doing
    caught_mid_run(first, out)

    other = OTHER[name]
    link = tmp_path / "link-to-out"
    link.symlink_to(out)
    seconds = {
        "plain": argv(name, inputs, out),
        "plain, through a symlink": argv(name, inputs, link),
        "--resume": argv(name, inputs, out, "--resume"),
        "--overwrite": argv(name, inputs, out, "--overwrite"),
        f"{other} --resume": argv(other, inputs, out, "--resume"),
    }
    protected = [out, *inputs.values()]
    for label, args in seconds.items():
        before = H.snapshot(*protected)
        outcome = H.run_dsv4_bounded(args, capsys, unstick=first.close)
        try:
            H.assert_refused_as_held(outcome, out=out, pid=first.pid, before=before, protected=protected)
        except AssertionError as err:
            raise AssertionError(f"second run ({label}): {err}") from None

    first.thaw()
    rc, err = first.finish()
    assert rc == 0 and "Traceback" not in err, err
    assert tree_digest(out) == digest  # the first run's output, as if it had been alone
    assert not (out / H.LOCK).exists()


@pytest.mark.parametrize("name", list(WRITERS))
def test_lock_left_by_a_killed_run_does_not_block_resume(name, inputs, tmp_path, first_runs, capsys):
    digest, victim = reference(name, inputs, tmp_path, capsys)
    out = (tmp_path / "out").resolve()
    first = first_runs(name, victim, argv(name, inputs, out))
    first.wait_ready()
    first.kill9()
    # the kernel released the flock with the process; its file, naming the dead pid, stays
    assert H.lock_holder(out)["pid"] == first.pid
    assert H.looks_complete(out) is None
    if Path("/proc/locks").exists():
        assert H.flock_holders(out / H.LOCK) == set()
    again = shutil.copytree(out, tmp_path / "again", symlinks=True)

    for folder, flag in ((out, "--resume"), (again, "--overwrite")):
        outcome = H.run_dsv4_bounded(argv(name, inputs, folder, flag), capsys, unstick=lambda: None)
        assert outcome.rc == 0 and not outcome.raised and not outcome.hung, f"{flag}: {outcome.show()}"
        assert tree_digest(folder) == digest, flag
        assert not (folder / H.LOCK).exists(), flag


@needs_proc_locks
def test_validate_of_a_folder_being_written_does_not_call_it_valid(inputs, tmp_path, first_runs, capsys):
    """A reader is not a second writer, but `dsv4 validate` saying "valid" of a folder another run is still
    writing makes an unfinished output look complete."""
    _, victim = reference("dequant", inputs, tmp_path, capsys)
    out = (tmp_path / "out").resolve()
    first = first_runs("dequant", victim, argv("dequant", inputs, out))
    first.wait_ready()
    first.freeze()
    caught_mid_run(first, out)
    before = H.snapshot(out)
    outcome = H.run_dsv4_bounded(["validate", out], capsys, unstick=first.close)
    H.assert_refused(
        outcome, names=[str(out), H.JOURNAL, H.LOCK], before=before, protected=[out], checker=True
    )
