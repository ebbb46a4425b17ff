"""The promises the README makes, checked: CI runs its test command, its tier table is the real one,
the dsv4 command answers --help and --version, and the unit tier imports no heavy package."""

import configparser
import json
import re
from pathlib import Path

import pytest

from harness.markers import TIERS
from pipeline.cli import SUBCOMMANDS
from pipeline.cli import main as dsv4

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def readme_code_lines() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines()]


def test_ci_runs_exactly_the_readme_test_command():
    test_commands = [line for line in readme_code_lines() if line.endswith("&& venv/bin/tox")]
    assert len(test_commands) == 1, "the README names one test command"
    ci_lines = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()]
    assert test_commands[0] in ci_lines
    assert "set -euo pipefail" in ci_lines  # a failing step fails CI


def test_readme_tier_table_is_the_marker_table():
    section = README.split("## Test tiers", 1)[1].split("\n## ", 1)[0]
    table = section.split("| marker |", 1)[1].split("\n\n", 1)[0]
    listed = re.findall(r"^\| `(\w+)` \|", table, flags=re.M)
    assert listed == [tier.name for tier in TIERS]


def test_default_tox_run_covers_every_env_and_tiers_fail_on_missing_requirements():
    tox = configparser.ConfigParser(interpolation=None)
    tox.read(ROOT / "tox.ini")
    envs = [e.strip() for e in tox["tox"]["env_list"].split(",")]
    assert envs == ["lint", "unit", "quant", "vllm"]
    assert "(unit or slow) and not (tiny or quant or vllm or gpu or b200)" in tox["testenv:unit"]["commands"]
    assert "DSV4_REQUIRE = quant" in tox["testenv:quant"]["set_env"]
    assert "DSV4_REQUIRE = vllm" in tox["testenv:vllm"]["set_env"]


def test_dsv4_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as done:
        dsv4(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for module in SUBCOMMANDS:
        command = module.rsplit(".", 1)[1].removesuffix("_cmd").replace("_", "-")
        assert re.search(rf"^    {command}(\s|$)", out, flags=re.M), command


def test_demo_runs_and_reports_the_exact_steps_exact(capsys):
    assert dsv4(["demo", "--rows", "256", "--cols", "512", "--json"]) == 0
    rows = {row["step"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["MXFP4 -> BF16 (dsv4 dequant)"]["exact"] is True
    assert rows["MXFP4 -> FP8 block, UE8M0 tiles (re-encode)"]["exact"] is True
    assert rows["MXFP4 -> BF16 -> NVFP4 (experts recipe)"]["exact"] is False
    assert 0 < rows["BF16 -> NVFP4 (ModelOpt 0.47 rule)"]["rel_error"] < 0.2


def test_demo_rejects_bad_shape_with_one_line(capsys):
    assert dsv4(["demo", "--cols", "100"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "dsv4: error: --cols must be a positive multiple of 32 (the MXFP4 block); got 100"


def test_run5_the_code_digest_names_stale_code(tmp_path, capsys):
    """Seeds Run 5: the node ran code older than the fix ("wasn't synced properly"). The digest that
    `dsv4 --version` prints and the reports record changes with any byte of the packages' source."""
    import shutil

    from pipeline.cli import main as dsv4
    from pipeline.provenance import PACKAGES, code_digest

    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    assert code_digest(tmp_path) == code_digest()
    target = tmp_path / "patches" / "modelopt_patches.py"
    target.write_text(target.read_text() + "\n# a fix that did not reach the node\n")
    assert code_digest(tmp_path) != code_digest()
    with pytest.raises(SystemExit):
        dsv4(["--version"])
    assert code_digest() in capsys.readouterr().out


def test_a_mistyped_marker_is_an_error_not_a_dropped_test(pytestconfig):
    """pyproject's strict_markers (a test marked `unti` stops collection instead of dropping out of
    -m unit) and testpaths, read from this session's own configuration. (pytest 9 ignored
    --strict-markers given through addopts here; the ini option is what works.)"""
    assert pytestconfig.getini("strict_markers") is True
    assert pytestconfig.getini("testpaths") == ["tests"]
