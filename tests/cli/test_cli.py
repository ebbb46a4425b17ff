"""The `dsv4` command layer (pipeline/cli/): one module per command, named after it; help that starts
without torch and shows every default; one line and exit 2 for a mistyped command."""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import SUBCOMMANDS, build_parser, command_names
from pipeline.cli import main as dsv4
from pipeline.step_options import DEFAULT_GPU_WORKERS

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter: every torch import is refused and recorded under the argv that asked for
# it, so one interpreter judges every argv (a refused import leaves nothing in sys.modules behind).
TORCH_PROBE = """
import contextlib, io, json, sys
asked = []
class RefuseTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            asked.append(name)
            raise ImportError("torch is refused here")
sys.meta_path.insert(0, RefuseTorch())
from pipeline.cli import main
found = {}
for argv in json.loads(sys.argv[1]):
    asked.clear()
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit, ImportError):
        main(argv)
    found[" ".join(argv)] = {"torch": bool(asked), "printed": bool(out.getvalue())}
print(json.dumps(found))
"""


@pytest.fixture(scope="module")
def torch_at_start() -> dict[str, dict]:
    """{argv: whether it asked for torch, whether it printed anything}, from one fresh interpreter."""
    argvs = [["--help"], ["--version"], *([name, "--help"] for name in command_names())]
    out = subprocess.run(
        [sys.executable, "-c", TORCH_PROBE, json.dumps(argvs)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    return json.loads(out.stdout)


@pytest.mark.parametrize("argv", ["--help", "--version"])
def test_dsv4_help_and_version_start_without_torch(torch_at_start, argv):
    assert torch_at_start[argv] == {"torch": False, "printed": True}


@pytest.mark.parametrize("command", command_names())
def test_command_help_starts_without_torch(torch_at_start, command):
    assert torch_at_start[f"{command} --help"] == {"torch": False, "printed": True}


def test_every_command_module_is_named_after_its_command():
    for module in SUBCOMMANDS:
        package, _, name = module.rpartition(".")
        assert package == "pipeline.cli"
        assert (ROOT / "pipeline" / "cli" / f"{name}.py").is_file()
    assert len(set(command_names())) == len(SUBCOMMANDS)


def test_command_modules_never_import_each_other():
    """Shared code lives in pipeline/cli/options.py or in a step's module, never in another command."""
    commands = set(SUBCOMMANDS)
    for module in SUBCOMMANDS:
        tree = ast.parse((ROOT / "pipeline" / "cli" / f"{module.rsplit('.', 1)[1]}.py").read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
            f"{n.module}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names
        }
        assert not (imported & (commands - {module})), module


def test_a_mistyped_command_names_the_nearest_one_on_one_line(capsys):
    assert dsv4(["conver", "/some/export", "/some/dst"]) == 2
    assert capsys.readouterr().err == "dsv4: error: unknown command 'conver'; did you mean 'convert'?\n"
    assert dsv4(["fix_config"]) == 2
    assert (
        capsys.readouterr().err == "dsv4: error: unknown command 'fix_config'; did you mean 'fix-config'?\n"
    )


def test_an_unknown_command_with_no_near_one_lists_the_commands(capsys):
    assert dsv4(["--quiet", "zzz"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        "dsv4: error: unknown command 'zzz'; the commands are demo,"
    )


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


def _options() -> list[tuple[str, argparse.Action]]:
    """(command, option) for every option of every command, each registered in full."""
    return [(c, a) for c, p in _commands(build_parser()).items() for a in p._actions if a.option_strings]


def test_help_texts_leave_defaults_to_the_formatter():
    """The formatter appends each default; a help text that spells one out by hand goes stale."""
    written = [(c, a.option_strings[0]) for c, a in _options() if a.help and "default" in a.help.lower()]
    assert written == []


def test_help_shows_the_defaults_that_say_something(capsys):
    with pytest.raises(SystemExit):
        dsv4(["dequant", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "largest output shard, GiB of tensor data (default: 5.0)" in text
    assert "(default: False)" not in text and "(default: None)" not in text
    assert re.search(
        r"--workers N\s+CPU converter threads running ahead of the writer; unset: one per core this process "
        r"may use",
        text,
    )
    assert re.search(rf"--gpu-workers N\s+with a CUDA device: .* unset: {DEFAULT_GPU_WORKERS}", text)


def test_target_vllm_is_one_option_everywhere():
    found = {
        c: (a.help, tuple(a.choices), a.default) for c, a in _options() if "--target-vllm" in a.option_strings
    }
    assert set(found) == {"convert", "fix-config", "serve", "use-plugin"}
    assert len(set(found.values())) == 1


def test_only_the_command_run_is_registered_in_full():
    listed = _commands(build_parser(commands=("inspect",)))
    assert list(listed) == command_names()
    assert [name for name, p in listed.items() if p.get_default("func") is not None] == ["inspect"]
