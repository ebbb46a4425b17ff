"""pipeline.amax without ModelOpt: the two readers (ours, NVIDIA's per-rank dumps), the name map and the
rules that resolve an amax file into one table per release module."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pipeline.amax import FALLBACK, build_table, load_table, read_amax, resolve_name
from pipeline.amax.names import QuantizerNameError
from pipeline.errors import DsV4Error

pytestmark = pytest.mark.unit

N_EXPERTS = 4
# one of each quantizer role `dsv4 quantize` records for the full recipe (ModelOpt 0.47, transformers 5.23)
ROLES = [
    "model.layers.1.mlp.experts.gate_up_proj_weight_quantizers.2",
    "model.layers.1.mlp.experts.down_proj_weight_quantizers.2",
    "model.layers.1.mlp.experts.gate_up_proj_input_quantizer",
    "model.layers.1.mlp.experts.down_proj_input_quantizer",
    *(
        f"model.layers.1.{m}.{kind}_quantizer"
        for m in (
            "mlp.shared_experts.gate_proj",
            "mlp.shared_experts.up_proj",
            "mlp.shared_experts.down_proj",
            "self_attn.q_a_proj",
            "self_attn.q_b_proj",
            "self_attn.kv_proj",
            "self_attn.o_b_proj",
            "self_attn.compressor.kv_proj",
            "self_attn.compressor.gate_proj",
            "self_attn.compressor.indexer.kv_proj",
            "self_attn.compressor.indexer.gate_proj",
            "self_attn.compressor.indexer.q_b_proj",
            "self_attn.compressor.indexer.scorer.weights_proj",
        )
        for kind in ("weight", "input")
    ),
]


def test_the_name_table(snapshot):
    table = {k: (r.kind, list(r.modules)) for k in ROLES for r in [resolve_name(k, N_EXPERTS)]}
    assert table == snapshot
    assert table[ROLES[0]] == ("weight", ["layers.1.ffn.experts.2.w1", "layers.1.ffn.experts.2.w3"])
    assert table[ROLES[2]][1] == [f"layers.1.ffn.experts.{e}.{w}" for w in ("w1", "w3") for e in range(4)]
    nv = resolve_name("mtp.0.ffn.experts.3.w2_input_quantizer._amax", N_EXPERTS)
    assert (nv.kind, nv.modules) == ("input", ("mtp.0.ffn.experts.3.w2",))


@pytest.mark.parametrize(
    "key",
    [
        "model.layers.1.self_attn.o_a_proj.output_quantizer",  # not a weight or input quantizer
        "model.layers.1.self_attn.nonesuch.weight_quantizer",  # no dialect-H rule names the module
        "model.layers.1.mlp.experts.gate_proj_weight_quantizers.0",  # not a fused parameter
        "layers.1.ffn.experts.0.w4_weight_quantizer._amax",
    ],
)
def test_a_name_no_spelling_maps_is_refused(key):
    with pytest.raises(QuantizerNameError):
        resolve_name(key, N_EXPERTS)


def ours(tmp_path: Path, values: dict[str, float], name: str = "amax.safetensors") -> Path:
    path = tmp_path / name
    save_file({k: torch.tensor(v, dtype=torch.float32) for k, v in values.items()}, path)
    return path


def experts_layer(
    layer: int, gate_up=(0.5, 0.25, 0.75, 1.0), down=0.5, inputs=(3.0, 6.0)
) -> dict[str, float]:
    p = f"model.layers.{layer}.mlp.experts."
    out = {f"{p}gate_up_proj_weight_quantizers.{e}": v for e, v in enumerate(gate_up)}
    out |= {f"{p}down_proj_weight_quantizers.{e}": down for e in range(N_EXPERTS)}
    return out | {f"{p}gate_up_proj_input_quantizer": inputs[0], f"{p}down_proj_input_quantizer": inputs[1]}


def test_our_format_resolves_per_release_module(tmp_path):
    t = load_table(ours(tmp_path, experts_layer(0) | experts_layer(1, inputs=(4.0, 2.0))), N_EXPERTS)
    assert t.weight("layers.0.ffn.experts.2.w3").amax == 0.75 == t.weight("layers.0.ffn.experts.2.w1").amax
    assert (
        t.input("layers.1.ffn.experts.3.w1").amax == 4.0 and t.input("layers.1.ffn.experts.0.w2").amax == 2.0
    )
    assert (
        "model.layers.1.mlp.experts.down_proj_input_quantizer" in t.input("layers.1.ffn.experts.0.w2").where
    )
    # NVIDIA's fallback per projection: the largest over the decoder layers
    assert t.fallback_input("w1").amax == 4.0 and t.fallback_input("w2").amax == 6.0
    assert "fallback" in t.fallback_input("w2").where and "fallback" in FALLBACK


def test_the_quantize_report_beside_the_snapshot_names_the_modelopt(tmp_path):
    path = ours(tmp_path, experts_layer(0))
    assert read_amax(path).modelopt_version is None
    (tmp_path / "dsv4-quantize-report.json").write_text('{"versions": {"nvidia-modelopt": "0.47.0"}}')
    assert read_amax(path).modelopt_version == "0.47.0"


def test_shared_input_groups_take_the_max_weight_amax(tmp_path):
    values = {
        "model.layers.0.self_attn.q_a_proj.weight_quantizer": 0.25,
        "model.layers.0.self_attn.kv_proj.weight_quantizer": 0.5,
        "model.layers.0.self_attn.compressor.gate_proj.weight_quantizer": 0.375,
        "model.layers.0.self_attn.o_b_proj.weight_quantizer": 0.125,  # alone: keeps its own
        "model.layers.0.mlp.shared_experts.gate_proj.weight_quantizer": 0.25,
        "model.layers.0.mlp.shared_experts.up_proj.weight_quantizer": 0.28125,
        "model.layers.0.mlp.shared_experts.down_proj.weight_quantizer": 0.0625,
        "model.layers.1.self_attn.q_a_proj.weight_quantizer": 0.125,  # another layer: another group
    }
    t = load_table(ours(tmp_path, values), N_EXPERTS)
    assert [t.weight(f"layers.0.attn.{m}").amax for m in ("wq_a", "wkv", "compressor.wgate")] == [0.5] * 3
    assert t.weight("layers.0.attn.wo_b").amax == 0.125 and t.weight("layers.1.attn.wq_a").amax == 0.125
    assert (
        t.weight("layers.0.ffn.shared_experts.w1").amax
        == 0.28125
        == t.weight("layers.0.ffn.shared_experts.w3").amax
    )
    assert t.weight("layers.0.ffn.shared_experts.w2").amax == 0.0625
    assert "rule attention-input" in t.weight("layers.0.attn.wq_a").where


@pytest.mark.parametrize("bad", [0.0, float("nan"), float("inf"), -1.0])
@pytest.mark.parametrize("kind", ["weight", "input"])
def test_an_unusable_amax_in_our_format_is_refused_naming_file_and_key(tmp_path, bad, kind):
    values = experts_layer(0)
    key = f"model.layers.0.mlp.experts.{'gate_up_proj_weight_quantizers.1' if kind == 'weight' else 'down_proj_input_quantizer'}"
    values[key] = bad
    path = ours(tmp_path, values)
    with pytest.raises(DsV4Error, match=re.escape(f"{path}: key {key}")):
        load_table(path, N_EXPERTS)


@pytest.mark.parametrize(
    "tensor, why",
    [
        (torch.tensor(1.0, dtype=torch.float16), "float16"),
        (torch.tensor([1.0]), r"float32 \[1\]"),
    ],
)
def test_a_value_that_is_not_a_0d_float32_is_refused(tmp_path, tensor, why):
    path = tmp_path / "amax.safetensors"
    key = "model.layers.0.mlp.experts.down_proj_input_quantizer"
    save_file({key: tensor}, path)
    with pytest.raises(DsV4Error, match=f"{re.escape(str(path))}: key {re.escape(key)}: {why}"):
        read_amax(path)


def test_unknown_keys_and_unreadable_files_are_named(tmp_path):
    path = ours(tmp_path, experts_layer(0) | {"model.layers.0.self_attn.nonesuch.weight_quantizer": 1.0})
    with pytest.raises(
        DsV4Error, match=re.escape(f"{path}: key model.layers.0.self_attn.nonesuch.weight_quantizer")
    ):
        load_table(path, N_EXPERTS)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(DsV4Error, match=re.escape(str(junk))):
        read_amax(junk)
    with pytest.raises(DsV4Error, match="no such amax"):
        read_amax(tmp_path / "absent.safetensors")


# ---- NVIDIA's ptq.py dumps ------------------------------------------------------------------------


def nvidia(folder: Path, ranks: dict[int, dict[str, float]], mp: int | None = None) -> Path:
    folder.mkdir(exist_ok=True)
    for r, values in ranks.items():
        torch.save(
            {k: torch.tensor(v, dtype=torch.float32) for k, v in values.items()},
            folder / f"amax_dict_rank{r}-mp{mp or len(ranks)}.pt",
        )
    return folder


def nv(layer: int, e: int, w: str, kind: str) -> str:
    return f"layers.{layer}.ffn.experts.{e}.{w}_{kind}_quantizer._amax"


def test_nvidia_ranks_merge_and_w1_w3_share_their_max(tmp_path):
    r0 = {nv(0, 0, "w1", "weight"): 0.5, nv(0, 0, "w3", "weight"): 0.75, nv(0, 0, "w1", "input"): 2.0}
    r0 |= {nv(0, 0, "w3", "input"): 3.0, nv(0, 0, "w2", "input"): 0.0}  # 0: this expert saw no token
    r1 = {nv(0, 2, "w1", "input"): 5.0, nv(0, 2, "w2", "input"): 7.0, nv(0, 2, "w2", "weight"): 0.25}
    t = load_table(nvidia(tmp_path / "nv", {0: r0, 1: r1}), N_EXPERTS)
    assert t.source.format == "nvidia" and len(t.source.files) == 2
    assert t.weight("layers.0.ffn.experts.0.w1").amax == 0.75 == t.weight("layers.0.ffn.experts.0.w3").amax
    assert t.input("layers.0.ffn.experts.0.w1").amax == 3.0 == t.input("layers.0.ffn.experts.0.w3").amax
    assert t.input("layers.0.ffn.experts.0.w2") is None and len(t.uncalibrated_inputs) == 1
    assert t.fallback_input("w2").amax == 7.0 and t.fallback_input("w1").amax == 5.0
    assert t.weight("layers.0.ffn.experts.2.w1") is None  # the converter takes it from the weights


def test_nvidia_dumps_that_overlap_disagree_or_lack_a_rank_are_refused(tmp_path):
    a = {nv(0, 0, "w1", "input"): 1.0}
    with pytest.raises(DsV4Error, match=r"amax_dict_rank1-mp2\.pt: key layers\.0\.ffn\.experts\.0\.w1_input"):
        read_amax(nvidia(tmp_path / "overlap", {0: a, 1: a}))
    with pytest.raises(DsV4Error, match=r"rank\(s\) \[1\] missing"):
        read_amax(nvidia(tmp_path / "lacking", {0: a}, mp=2))
    mixed = nvidia(tmp_path / "mixed", {0: a}, mp=1)
    nvidia(mixed, {1: {nv(0, 1, "w1", "input"): 1.0}}, mp=2)
    with pytest.raises(DsV4Error, match="different model-parallel sizes"):
        read_amax(mixed)
    with pytest.raises(DsV4Error, match="no amax_dict_rank"):
        read_amax((tmp_path / "empty").mkdir() or tmp_path / "empty")


def test_a_hostile_or_odd_nvidia_dump_is_named(tmp_path):
    folder = tmp_path / "nv"
    folder.mkdir()
    torch.save([1, 2], folder / "amax_dict_rank0-mp1.pt")
    with pytest.raises(DsV4Error, match=r"amax_dict_rank0-mp1\.pt: a list"):
        read_amax(folder)
    (folder / "amax_dict_rank0-mp1.pt").write_bytes(b"garbage")
    with pytest.raises(DsV4Error, match=r"amax_dict_rank0-mp1\.pt: not a readable"):
        read_amax(folder)


def test_our_format_and_nvidias_resolve_the_same_values_alike(tmp_path):
    values = experts_layer(0)
    ranks: dict[int, dict[str, float]] = {0: {}, 1: {}}
    for e in range(N_EXPERTS):
        r = ranks[e // 2]
        r[nv(0, e, "w1", "weight")] = r[nv(0, e, "w3", "weight")] = values[
            f"model.layers.0.mlp.experts.gate_up_proj_weight_quantizers.{e}"
        ]
        r[nv(0, e, "w2", "weight")] = 0.5
        r[nv(0, e, "w1", "input")] = r[nv(0, e, "w3", "input")] = 3.0
        r[nv(0, e, "w2", "input")] = 6.0
    a = load_table(ours(tmp_path, values), N_EXPERTS)
    b = build_table(read_amax(nvidia(tmp_path / "nv", ranks)), N_EXPERTS)
    assert {k: (m.weight.amax, m.input.amax) for k, m in a.modules.items()} == {
        k: (m.weight.amax, m.input.amax) for k, m in b.modules.items()
    }
