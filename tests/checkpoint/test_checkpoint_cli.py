"""`dsv4 validate` and `dsv4 inspect`: exit codes, problem lines naming file and key, --json."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from harness.checkpoints import tree_digest
from pipeline import cli
from pipeline.checkpoint import CONFIG_NAME, INDEX_NAME, read_index
from pipeline.release_layout import release_tensors

pytestmark = pytest.mark.unit

MODULES = ("pipeline.cli.validate", "pipeline.cli.inspect")


def shard_count(ckpt: Path) -> int:
    """How many shards the checkpoint's index names."""
    return len(set(read_index(ckpt / INDEX_NAME).values()))


def config_of(ckpt: Path) -> dict:
    return json.loads((ckpt / CONFIG_NAME).read_text())


@pytest.fixture
def dsv4(monkeypatch, capsys):
    """Run `dsv4 ARGS...` in-process (only this module's subcommands registered); returns (rc, out, err)."""
    monkeypatch.setattr(cli, "SUBCOMMANDS", MODULES)

    def run(*argv: str) -> tuple[int, str, str]:
        rc = cli.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return rc, out, err

    return run


def test_subcommands_are_listed_in_the_cli():
    for m in MODULES:
        assert m in cli.SUBCOMMANDS


def test_help_describes_the_checks(dsv4):
    with pytest.raises(SystemExit) as exc:
        dsv4("validate", "--help")
    assert exc.value.code == 0


def test_validate_valid_exits_0(dsv4, tiny_release):
    before = tree_digest(tiny_release)
    rc, out, _ = dsv4("validate", tiny_release)
    assert rc == 0 and f"valid; layout release-fp8-mxfp4; {shard_count(tiny_release)} shard(s)" in out
    rc, out, _ = dsv4("validate", tiny_release, "--json", "--full-scales")
    data = json.loads(out)
    assert rc == 0 and data["ok"] is True and data["scales_checked"] == data["scales_total"] > 0
    assert tree_digest(tiny_release) == before


def test_validate_invalid_exits_1_and_names_file_and_key(dsv4, tiny_release):
    shard = tiny_release / read_index(tiny_release / INDEX_NAME)["layers.1.attn.attn_sink"]  # layer 1's
    shard.unlink()
    rc, out, _ = dsv4("validate", tiny_release)
    assert rc == 1
    assert f"problem: {shard}: key layers.1." in out
    assert "INVALID" in out
    rc, out, _ = dsv4("validate", tiny_release, "--json")
    data = json.loads(out)
    assert rc == 1 and data["ok"] is False and data["problems"][0]["key"].startswith("layers.1.")


def test_validate_expect_layout(dsv4, tiny_release):
    rc, out, _ = dsv4("validate", tiny_release, "--expect", "bf16")
    assert rc == 1 and "needs a BF16" in out


def test_validate_unusable_path(dsv4, tmp_path):
    rc, _, err = dsv4("validate", tmp_path / "nope")
    assert rc == 2 and err.startswith("dsv4: error: ") and "no such file or directory" in err


def test_inspect_text_and_json(dsv4, tiny_release):
    before = tree_digest(tiny_release)
    rc, out, _ = dsv4("inspect", tiny_release)
    assert rc == 0
    for fragment in (
        "layout      release-fp8-mxfp4",
        "routed experts",
        "F8_E8M0",
        "compress_ratios",
        "num_hash_layers",
    ):
        assert fragment in out
    rc, out, _ = dsv4("inspect", tiny_release, "--json")
    s = json.loads(out)
    config = config_of(tiny_release)
    # routed-expert weights and their scales in the layers (the MTP block's count under the role "mtp")
    experts = [t.key for t in release_tensors(config) if re.match(r"layers\.\d+\.ffn\.experts\.", t.key)]
    assert experts and s["shards"] == shard_count(tiny_release)
    assert s["by_role"]["routed experts"]["tensors"] == len(experts)
    ratios = config["compress_ratios"]
    assert s["config"]["compress_ratios"] == {
        "entries": len(ratios),
        "counts": {str(r): n for r, n in Counter(ratios).items()},
    }
    assert tree_digest(tiny_release) == before


def test_inspect_bad_path_is_a_one_line_error(dsv4, tmp_path):
    rc, _, err = dsv4("inspect", tmp_path / "nope")
    assert rc == 2 and err.startswith("dsv4: error: ") and "no such file" in err
