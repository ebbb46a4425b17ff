"""Time the laptop loop (`pytest -m unit -n auto`) against its budget, and against another revision in
the same run.

    python bench/unit_tier.py                       # this checkout, 3 runs, vs the 20 s budget
    python bench/unit_tier.py --baseline 69f0e47     # and a git worktree of that revision, interleaved

Runs alternate (ours, baseline, ours, ...) so a machine that gets busier mid-run slows both sides alike.
Prints each run's wall time (interpreter start included) and pytest's own seconds, the test counts, the
medians, and the ratios ours/budget and ours/baseline. Nothing in the test suite is timed; this is how
"the unit tier is no slower than before" is checked.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 20.0  # the laptop loop's budget on the 2-core machine (README, Test tiers)
SUMMARY = re.compile(r"(\d+) passed.* in ([\d.]+)s")


def run_once(tree: Path, python: str, extra: list[str]) -> tuple[float, float, int]:
    """One `pytest -m unit -n auto` in ``tree``: (wall s, pytest's s, tests passed)."""
    argv = [python, "-m", "pytest", "-m", "unit", "-n", "auto", "-q", "-p", "no:cacheprovider", *extra]
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=tree, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{tree}: pytest exited {done.returncode}:\n{done.stdout[-3000:]}{done.stderr[-2000:]}")
    match = SUMMARY.search(done.stdout.strip().splitlines()[-1])
    if match is None:
        sys.exit(f"{tree}: no pytest summary line in:\n{done.stdout[-2000:]}")
    return wall, float(match.group(2)), int(match.group(1))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="runs per tree (default: %(default)s)")
    p.add_argument("--baseline", metavar="REV", help="also time a git worktree of REV, interleaved")
    p.add_argument("--python", default=sys.executable, help="interpreter with the test tools (default: this)")
    p.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = p.parse_args()

    trees = {"ours": ROOT}
    # Beside this checkout, so that its ../shared is the same reference data: a baseline without it would
    # skip the reference tests and look faster than it is.
    with tempfile.TemporaryDirectory(
        prefix=".unit-tier-baseline-", dir=ROOT.parent, ignore_cleanup_errors=True
    ) as tmp:
        if args.baseline:
            base = Path(tmp)
            subprocess.run(
                ["git", "worktree", "add", "--detach", str(base), args.baseline], cwd=ROOT, check=True
            )
            trees["baseline"] = base
        try:
            results: dict[str, list[tuple[float, float, int]]] = {name: [] for name in trees}
            for i in range(args.runs):
                for name, tree in trees.items():
                    wall, pytest_s, passed = run_once(tree, args.python, args.pytest_args)
                    results[name].append((wall, pytest_s, passed))
                    print(
                        f"run {i + 1} {name:8s} wall {wall:6.1f} s  pytest {pytest_s:6.1f} s  {passed} passed"
                    )
        finally:
            if args.baseline:
                subprocess.run(["git", "worktree", "remove", "--force", str(trees["baseline"])], cwd=ROOT)
    medians = {name: statistics.median(r[0] for r in runs) for name, runs in results.items()}
    for name, runs in results.items():
        print(
            f"{name:8s} median wall {medians[name]:6.1f} s, pytest {statistics.median(r[1] for r in runs):6.1f} s, "
            f"{runs[-1][2]} tests"
        )
    print(f"ours / budget ({BUDGET_S:g} s): {medians['ours'] / BUDGET_S:.2f}")
    if "baseline" in medians:
        print(f"ours / baseline: {medians['ours'] / medians['baseline']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
