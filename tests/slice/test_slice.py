"""`dsv4 slice` on the micro tiny release: a valid release-layout checkpoint whose every tensor is the
source's (byte for byte, or its first E router rows), whose config describes exactly its tensors, whose
hash routing table names only kept experts; and the refusals."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.checkpoints import tree_digest
from harness.tiny import tiny_config
from pipeline.checkpoint import Checkpoint, Layout, validate_checkpoint
from pipeline.cli import main as dsv4
from pipeline.errors import DsV4Error
from pipeline.release_layout import ROUTED_EXPERT, release_tensors
from pipeline.slice import (
    REPORT_NAME,
    layer_kinds,
    parse_layers,
    plan_slice,
    remap_tid2eid,
    select_layers,
    slice_checkpoint,
    sliced_config,
)

pytestmark = pytest.mark.unit


def dsv4_slice(argv: list[str]) -> int:
    return dsv4(["slice", *argv])


def raw(ck: Checkpoint, key: str) -> bytes:
    return ck.read(key).contiguous().view(torch.uint8).numpy().tobytes()


def source_key(key: str, layers: tuple[int, ...]) -> str:
    if key.startswith("layers."):
        _, n, rest = key.split(".", 2)
        return f"layers.{layers[int(n)]}.{rest}"
    return key


@pytest.fixture
def sliced(tiny_release, tmp_path):
    result = slice_checkpoint(tiny_release, tmp_path / "slice", layers=2, experts=2, progress=False)
    return tiny_release, result


def test_slice_validates_and_matches_the_release_layout_of_its_config(sliced):
    _, result = sliced
    report = validate_checkpoint(result.out_dir, full_scales=True, expect=Layout.RELEASE)
    assert report.ok, report.problems
    ck = Checkpoint.open(result.out_dir)
    want = {t.key: (t.dtype, t.shape) for t in release_tensors(ck.config)}
    assert {k: (i.dtype, i.shape) for k, i in ck.tensors.items()} == want


def test_config_is_rewritten_and_nothing_else_changes(sliced):
    src, result = sliced
    old = json.loads((src / "config.json").read_text())
    new = json.loads((result.out_dir / "config.json").read_text())
    assert result.plan.layers == (0, 3)  # hash-routed HCA + top-k CSA: the micro model's best two
    assert new["num_hidden_layers"] == 2
    assert new["n_routed_experts"] == 2
    assert new["num_hash_layers"] == 1
    assert new["compress_ratios"] == [
        old["compress_ratios"][0],
        old["compress_ratios"][3],
        *old["compress_ratios"][4:],
    ]
    assert new["num_nextn_predict_layers"] == old["num_nextn_predict_layers"] == 1
    assert new["num_experts_per_tok"] <= new["n_routed_experts"]
    changed = {k for k in old if old[k] != new[k]}
    assert changed == {"num_hidden_layers", "n_routed_experts", "num_hash_layers", "compress_ratios"}


def test_every_tensor_is_the_sources_byte_for_byte_or_its_first_rows(sliced):
    src, result = sliced
    a, b = Checkpoint.open(src), Checkpoint.open(result.out_dir)
    experts = result.plan.experts
    kinds = set()
    for key in b.tensors:
        skey = source_key(key, result.plan.layers)
        if key.endswith((".ffn.gate.weight", ".ffn.gate.bias")):
            assert torch.equal(
                b.read(key).view(torch.uint8), a.read(skey)[:experts].contiguous().view(torch.uint8)
            )
            kinds.add("rows")
        elif key.endswith(".ffn.gate.tid2eid"):
            kinds.add("remap")
        else:
            assert raw(b, key) == raw(a, skey), key
            kinds.add(b.tensors[key].dtype)
    assert {"rows", "remap", "F8_E4M3", "F8_E8M0", "I8", "BF16", "F32"} <= kinds
    mtp_experts = {
        int(m["e"])
        for k in b.tensors
        if (m := ROUTED_EXPERT.match(k.rsplit(".", 1)[0])) and m["kind"] == "mtp"
    }
    assert mtp_experts == set(range(experts))


def test_tid2eid_ids_are_kept_experts_distinct_per_token(sliced):
    src, result = sliced
    a, b = Checkpoint.open(src), Checkpoint.open(result.out_dir)
    experts = result.plan.experts
    hashes = [k for k in b.tensors if k.endswith("tid2eid")]
    assert hashes == ["layers.0.ffn.gate.tid2eid"]
    new, old = b.read(hashes[0]), a.read(source_key(hashes[0], result.plan.layers))
    assert new.dtype == torch.int64 and new.shape == old.shape
    assert int(new.min()) >= 0 and int(new.max()) < experts
    assert all(len(set(row)) == len(row) for row in new.tolist())
    untouched = (old < experts).all(dim=1)  # rows already within the kept experts keep their routing
    assert torch.equal(new[untouched], old[untouched])
    report = json.loads((result.out_dir / REPORT_NAME).read_text())
    assert report["tokens_rerouted"][hashes[0]] == f"{int((~untouched).sum())} of {old.shape[0]}"


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 8).flatmap(
        lambda k: st.tuples(
            st.just(k),
            st.integers(k, 12),
            st.lists(st.lists(st.integers(0, 63), min_size=k, max_size=k), min_size=1, max_size=20),
        )
    )
)
def test_remap_rule(case):
    k, experts, rows = case
    ids = torch.tensor(rows, dtype=torch.int64)
    out = remap_tid2eid(ids, experts)
    for before, after in zip(ids.tolist(), out.tolist(), strict=True):
        assert all(0 <= e < experts for e in after) and len(set(after)) == k
        seen = set()
        for b, a in zip(before, after, strict=True):
            if b < experts and b not in seen:
                assert a == b  # a kept expert that the row names first is not moved
            seen.add(b)


def test_remap_takes_the_next_free_expert_from_id_mod_e():
    ids = torch.tensor([[9, 1, 5], [3, 7, 11]])
    assert remap_tid2eid(ids, 4).tolist() == [[2, 1, 3], [3, 0, 1]]


def test_explicit_layers_are_renumbered_in_order(tiny_release, tmp_path):
    result = slice_checkpoint(tiny_release, tmp_path / "s", layers=(3, 1), experts=4, progress=False)
    cfg = json.loads((result.out_dir / "config.json").read_text())
    assert result.plan.layers == (1, 3)
    assert cfg["num_hash_layers"] == 1 and cfg["compress_ratios"] == [4, 4, 0]
    a, b = Checkpoint.open(tiny_release), Checkpoint.open(result.out_dir)
    assert raw(b, "layers.0.attn.wq_a.weight") == raw(a, "layers.1.attn.wq_a.weight")
    assert raw(b, "layers.1.ffn.gate.bias") == raw(a, "layers.3.ffn.gate.bias")  # all 4 experts kept


def test_layer_selection_covers_kinds_and_prefers_the_first_layers():
    micro = tiny_config("micro")
    assert select_layers(micro, 2) == (0, 3)
    assert select_layers(micro, 3) == (0, 1, 2)  # the first three already cover every kind
    assert select_layers(micro, 4) == (0, 1, 2, 3)
    v4_like = dict(
        micro, num_hidden_layers=6, num_hash_layers=3, compress_ratios=[128, 128, 4, 128, 4, 128, 0]
    )
    assert select_layers(v4_like, 2) == (0, 4)  # hash-routed HCA + top-k CSA (the release's layers 0 and 4)
    assert layer_kinds(v4_like, 2) == {"hash", "csa"}
    assert parse_layers("2") == 2 and parse_layers("0,3") == (0, 3) and parse_layers("5,") == (5,)


@pytest.mark.parametrize(
    ("layers", "experts", "message"),
    [
        (2, 5, "--experts 5: the source has 4 routed experts"),
        (2, 1, "keep at least 2"),
        (5, 2, r"--layers 5: the source has 4 layer\(s\)"),
        (0, 2, "keep between 1 and 4"),
        ((0, 7), 2, "do not exist"),
        ((1, 1), 2, "named twice"),
    ],
)
def test_refuses_what_the_source_cannot_give(tiny_release, tmp_path, layers, experts, message):
    with pytest.raises(DsV4Error, match=message):
        slice_checkpoint(tiny_release, tmp_path / "s", layers=layers, experts=experts, progress=False)
    assert not (tmp_path / "s").exists()


def test_refuses_a_checkpoint_that_is_not_the_release(tiny_bf16, tmp_path, capsys):
    assert dsv4_slice([str(tiny_bf16), str(tmp_path / "s"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "dsv4 slice needs a release FP8+MXFP4" in err and "this is BF16" in err
    assert not (tmp_path / "s").exists()


def test_refuses_a_source_key_it_does_not_know(tiny_release):
    ck = Checkpoint.open(tiny_release)
    info = ck.tensors["layers.0.attn.wq_a.weight"]
    ck.tensors["layers.0.attn.extra.weight"] = info
    with pytest.raises(DsV4Error, match=r"layers\.0\.attn\.extra\.weight: not in the release layout"):
        plan_slice(ck, 2, 2)


def test_cli_dry_run_writes_nothing_and_resume_is_byte_identical(tiny_release, tmp_path, capsys):
    (tiny_release / "tokenizer.json").write_text("{}")
    before = tree_digest(tiny_release)
    assert (
        dsv4_slice([str(tiny_release), str(tmp_path / "d"), "--layers", "0,3", "--experts", "2", "--dry-run"])
        == 0
    )
    out = capsys.readouterr().out
    assert "layers.1 <- layers.3 (csa, topk)" in out and not (tmp_path / "d").exists()
    args = [str(tiny_release), str(tmp_path / "a"), "--experts", "2", "--quiet", "--max-shard-gib", "0.0005"]
    assert dsv4_slice(args) == 0
    first = tree_digest(tmp_path / "a")
    assert len([n for n in first if n.endswith(".safetensors")]) > 1 and "tokenizer.json" in first
    (tmp_path / "a" / "model.safetensors.index.json").unlink()
    victim = sorted(n for n in first if n.endswith(".safetensors"))[-1]
    (tmp_path / "a" / victim).unlink()
    assert dsv4_slice([*args, "--resume"]) == 0
    assert tree_digest(tmp_path / "a") == first
    assert dsv4_slice(args) == 2  # not empty, no --resume/--overwrite
    assert "not empty" in capsys.readouterr().err
    assert tree_digest(tiny_release) == before  # the source is only read


def test_cli_reports_bad_layer_numbers_as_a_usage_error(tiny_release, tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        dsv4_slice([str(tiny_release), str(tmp_path / "s"), "--layers", "0,x"])
    assert done.value.code == 2
    assert "layer numbers are integers separated by commas" in capsys.readouterr().err


def test_sliced_config_keeps_unrelated_keys_and_slices_per_layer_lists():
    cfg = dict(tiny_config("micro"), layer_types=["a", "b", "c", "d"])
    new = sliced_config(cfg, (1, 2), 3)
    assert new["layer_types"] == ["b", "c"] and new["hidden_size"] == cfg["hidden_size"]
    assert new["num_hash_layers"] == 1 and new["compress_ratios"] == [4, 0, 0]
