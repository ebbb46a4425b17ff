"""`dsv4 use-plugin CKPT [--off]` (pipeline/cli/use_plugin.py) on synthetic ModelOpt exports of the micro
model: it writes the plugin's architecture and the config `dsv4 convert` would write, keeps the
originals, changes nothing the second time, restores with --off, and refuses what is not an export.
Called through its own argparse registration (as `dsv4` calls it)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from harness.replica import clone_replica
from patches.vllm_plugin import ARCHITECTURE
from pipeline.cli import use_plugin as use_plugin_cmd
from pipeline.convert import plan_convert
from pipeline.errors import DsV4Error
from pipeline.vllm_config import MIXED_QUANT_CONFIG

pytestmark = pytest.mark.unit

FILES = ("config.json", "hf_quant_config.json")


def dsv4(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="dsv4")
    use_plugin_cmd.register(parser.add_subparsers())
    args = parser.parse_args(["use-plugin", *argv])
    return args.func(args)


def snapshot(ckpt: Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and mtime of every non-tensor file."""
    return {
        p.name: (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(ckpt.iterdir())
        if not p.name.endswith(".safetensors")
    }


@pytest.fixture
def export(exports, tmp_path):
    """A private copy of a micro export (experts recipe, dialect X unless asked)."""

    def get(recipe: str = "experts", dialect: str = "X") -> Path:
        return clone_replica(exports(recipe, dialect), tmp_path / f"export-{recipe}-{dialect}")

    return get


@pytest.mark.parametrize(("recipe", "dialect"), [("experts", "X"), ("full", "H")])
def test_it_writes_the_architecture_and_the_config_dsv4_convert_would(export, capsys, recipe, dialect):
    ckpt = export(recipe, dialect)
    original = {name: (ckpt / name).read_bytes() for name in FILES}
    plan = plan_convert(ckpt)  # what `dsv4 convert` would write beside its output
    assert dsv4(str(ckpt)) == 0
    out = capsys.readouterr().out
    config = json.loads((ckpt / "config.json").read_text())
    assert config == {**plan.config, "architectures": [ARCHITECTURE]}
    assert config["quantization_config"] == MIXED_QUANT_CONFIG
    assert config["num_nextn_predict_layers"] == 0  # an export has no MTP block
    assert json.loads((ckpt / "hf_quant_config.json").read_text()) == plan.hf_quant_config
    for name in FILES:  # the originals, kept once
        assert (ckpt / f"{name}.orig").read_bytes() == original[name]
    # it explains itself: each change with its rule and reason, and how to serve
    assert f"dialect {dialect}" in out
    for rule in ("[use-plugin] architectures", "[quant_layout] quantization_config", "[no-mtp]"):
        assert rule in out
    assert out.count("why: ") >= 4
    assert "--tokenizer-mode deepseek_v4" in out and "use-plugin --off" in out


def test_running_it_again_changes_nothing(export, capsys):
    ckpt = export()
    assert dsv4(str(ckpt)) == 0
    before = snapshot(ckpt)
    capsys.readouterr()
    assert dsv4(str(ckpt)) == 0
    assert "unchanged: config.json already names" in capsys.readouterr().out
    assert snapshot(ckpt) == before


def test_off_restores_the_export_as_it_was(export, capsys):
    ckpt = export()
    original = {name: (ckpt / name).read_bytes() for name in FILES}
    assert dsv4(str(ckpt)) == 0
    turned_on = (ckpt / "config.json").read_bytes()
    assert dsv4("--off", str(ckpt)) == 0
    assert {name: (ckpt / name).read_bytes() for name in FILES} == original
    capsys.readouterr()
    assert dsv4("--off", str(ckpt)) == 0  # idempotent
    assert "unchanged" in capsys.readouterr().out
    assert {name: (ckpt / name).read_bytes() for name in FILES} == original
    assert dsv4(str(ckpt)) == 0  # and on again, from the kept originals
    assert (ckpt / "config.json").read_bytes() == turned_on


def test_dry_run_writes_nothing(export, capsys):
    ckpt = export()
    before = snapshot(ckpt)
    assert dsv4("--dry-run", str(ckpt)) == 0
    assert "dry run: nothing written" in capsys.readouterr().out
    assert snapshot(ckpt) == before
    assert dsv4(str(ckpt)) == 0
    on = snapshot(ckpt)
    assert dsv4("--off", "--dry-run", str(ckpt)) == 0
    assert snapshot(ckpt) == on


@pytest.mark.parametrize("which", ["bf16", "release", "converted"])
def test_it_refuses_a_checkpoint_that_is_not_an_export(which, request, tmp_path):
    if which == "converted":  # `dsv4 convert`'s output: vLLM loads it without the plugin
        converted = request.getfixturevalue("converted")("experts", "X").out_dir
        ckpt = clone_replica(converted, tmp_path / "converted")
    else:
        ckpt = request.getfixturevalue(f"tiny_{which}")
    before = snapshot(ckpt)
    why = {"bf16": "BF16", "release": "release", "converted": "dialect N"}[which]
    with pytest.raises(DsV4Error, match=why):
        dsv4(str(ckpt))
    assert snapshot(ckpt) == before


def test_off_without_the_original_says_what_to_do(export):
    ckpt = export()
    assert dsv4(str(ckpt)) == 0
    (ckpt / "config.json.orig").unlink()
    with pytest.raises(DsV4Error, match=r"no config\.json\.orig to restore"):
        dsv4("--off", str(ckpt))
