"""pipeline.mapping: every key of every dialect (N, H, X) maps to exactly one outcome in the release layout.

The H and X key sets are derived from the release layout by inverse functions (harness/exports.py),
independently of the rule table (ordered string replacements, the way transformers' conversion
mapping spells them), and checked against real artefacts committed as fixtures:

* fixtures/mapping_x_micro_{full,experts}.json: every (key, dtype, shape) of a real ModelOpt 0.47.0 +
  transformers 5.23.0 export of the micro tiny model (`dsv4 e2e`, both recipes);
* fixtures/mapping_h_micro_state_dict.json: transformers 5.23.0's own DeepseekV4ForCausalLM state_dict
  for the micro config (module names of dialect H, experts fused 3-D).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from syrupy.extensions.json import JSONSnapshotExtension

from harness.exports import _EXPERT, TO, export_tensors, to_h
from harness.tiny import tiny_config
from pipeline import mapping as M
from pipeline.release_layout import PLAIN, release_weights

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "fixtures"
PRESETS = ("micro", "vllm-shaped")


@pytest.fixture
def json_snapshot(snapshot):
    return snapshot.use_extension(JSONSnapshotExtension)


def _fixture(name: str) -> list[tuple[str, str, tuple[int, ...]]]:
    doc = json.loads((FIXTURES / name).read_text())
    return [(k, d, tuple(s)) for k, d, s in doc["tensors"]]


def _dims(shape) -> str:
    return "x".join(map(str, shape)) or "scalar"


def snapshot_rows(p: M.Plan, config: dict, layout: dict | None = None) -> list[str]:
    """One line per source key: key dtype [shape] -> each written key with its dtype and shape | action
    | rule; then the target keys the input cannot have, with why."""
    layout = layout if layout is not None else M.target_layout(config)
    rows = []
    for m in sorted(p.mappings, key=lambda m: m.source):
        if m.writes:
            out = " + ".join(f"{w} {layout[w].dtype} [{_dims(layout[w].shape)}]" for w in m.writes)
        else:
            out = f"({m.target}: not written)"
        rows.append(f"{m.source} {m.dtype} [{_dims(m.shape)}] -> {out} | {m.action} | {m.rule}")
    rows += [f"(absent) {k}: {why.split(' (')[0]}" for k, why in p.absent]
    return rows


# ---- the table itself ---------------------------------------------------------------------------


def test_rule_examples_map_by_their_own_rule_only():
    for rule in M.RULES:
        for d in rule.dialects:
            hits = [r.name for r in M.RULES if d in r.dialects and r.regex.fullmatch(rule.example)]
            assert hits == [rule.name], (rule.name, d, hits)
            assert M.map_key(rule.example, d).rule == rule.name


def test_rule_and_action_tables_are_well_formed():
    assert len({r.name for r in M.RULES}) == len(M.RULES)
    for r in M.RULES:
        assert set(r.dialects) <= set(M.DIALECTS) and r.reason.strip(), r.name
        assert set(re.compile(r.pattern).groupindex) == set(re.findall(r"{(\w+)", r.target)), r.name
    pairs = [(a.form, a.target_fmt, a.where) for a in M.ACTIONS]
    assert len(set(pairs)) == len(pairs)
    # every action has a meaning; the ones no source form decides: CAST and UNIFY_W13 (decide_action),
    # the source choices of dsv4 convert --graft-from, and the actions of dsv4 convert --amax
    beyond_forms = {M.CAST, M.UNIFY_W13, M.GRAFT, M.TRANSCODE, M.FALLBACK_INPUT_SCALE}
    beyond_forms |= {M.REQUANTIZE_EXPERT, M.INPUT_SCALE, M.FP8_VIA_NVFP4, M.BF16_VIA_NVFP4, M.FP8_REQUANT}
    assert {a.action for a in M.ACTIONS} | beyond_forms == set(M.ACTION_NAMES)


def test_docs_equal_the_generated_table():
    doc = ROOT / "docs" / "mapping.md"
    assert doc.read_text() == M.rule_table_markdown(), "regenerate docs/mapping.md (see its header)"


# ---- dialect N: the target layout maps onto itself -----------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
def test_native_target_layout_maps_to_itself(preset):
    config = tiny_config(preset)
    tensors = M.target_tensors(config)
    p = M.plan(tensors, config)
    assert p.dialect == "N" and not p.absent
    for m in p.mappings:
        assert m.target == m.source and m.writes == (m.source,), m
        assert m.action in (M.COPY, M.KEEP_NVFP4, M.UNIFY_W13), m


def test_target_layout_is_the_release_with_nvfp4_experts():
    config = tiny_config("micro")
    target = M.target_layout(config)
    experts = [k for k in target if _EXPERT.search(M._base(k))]
    assert experts and {target[k].fmt for k in experts} == {M.NVFP4}
    from pipeline.release_layout import release_tensors

    release = {t.key for t in release_tensors(config)}
    mxfp4 = {k for k in release if _EXPERT.search(M._base(k))}
    assert set(target) - set(experts) == release - mxfp4
    assert len(experts) == 2 * len(mxfp4)


def test_the_release_itself_plans_only_with_nvfp4_experts():
    """The raw release (MXFP4 experts) is dialect N but cannot be the whole input: its experts drop."""
    from pipeline.release_layout import release_tensors

    config = tiny_config("micro")
    with pytest.raises(
        M.MappingError, match=r"target key\(s\) no source key writes: .*experts\.0\.w1\.weight"
    ):
        M.plan(release_tensors(config), config)
    m = M.map_key("layers.0.ffn.experts.0.w1.scale", "N", "F8_E8M0")
    assert m.action == M.DROP and m.writes == ()


# ---- dialects H and X: derived key sets map back onto the release layout -------------------------


def test_x_derivation_equals_the_real_modelopt_047_export():
    config = tiny_config("micro")
    for recipe in ("full", "experts"):
        real = sorted(_fixture(f"mapping_x_micro_{recipe}.json"))
        assert export_tensors(config, recipe, "X") == real, recipe


def test_h_names_equal_transformers_state_dict():
    """Our H inverse, with experts fused as transformers holds them, gives transformers' own names and
    shapes (dtypes there are the build default)."""
    config = tiny_config("micro")
    real = {k: s for k, _, s in _fixture("mapping_h_micro_state_dict.json")}
    ours = {}
    for w in release_weights(config):
        if w.name.startswith("mtp."):
            continue
        if _EXPERT.search(w.name):
            continue
        key = to_h(w.name if w.fmt == PLAIN else f"{w.name}.weight")
        ours[key] = tuple(w.shape)
    fused = {k for k in real if re.search(r"\.mlp\.experts\.(gate_up_proj|down_proj)$", k)}
    assert {k: v for k, v in real.items() if k not in fused} == ours
    assert len(fused) == 2 * config["num_hidden_layers"]


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("recipe", ["full", "experts"])
@pytest.mark.parametrize("dialect", ["H", "X"])
def test_export_maps_back_onto_the_release_layout(dialect, recipe, preset):
    config = tiny_config(preset)
    tensors = export_tensors(config, recipe, dialect)
    assert M.detect_dialect(k for k, _, _ in tensors) == dialect
    p = M.plan(tensors, config)
    target = M.target_layout(config)
    written = [w for m in p.mappings for w in m.writes]
    mtp = {k for k in target if k.startswith("mtp.")}
    assert len(written) == len(set(written)) and set(written) == set(target) - mtp
    assert {k for k, _ in p.absent} == mtp
    # each source key lands on the native key it was derived from
    for m in p.mappings:
        assert TO[dialect](m.target) == m.source, m


@pytest.mark.parametrize("recipe", ["full", "experts"])
def test_real_x_export_plans(recipe):
    config = tiny_config("micro")
    p = M.plan(_fixture(f"mapping_x_micro_{recipe}.json"), config)
    assert p.dialect == "X"
    assert {m.target for m in p.mappings if m.rule == "x.attn.kv_norm"} == {
        f"layers.{i}.attn.kv_norm.weight" for i in range(4)
    }


def test_no_key_of_any_dialect_matches_two_rules():
    config = tiny_config("micro")
    for dialect in M.DIALECTS:
        for recipe in ("full", "experts"):
            for k, _, _ in export_tensors(config, recipe, dialect):
                hits = [r.name for r in M.RULES if dialect in r.dialects and r.regex.fullmatch(k)]
                assert len(hits) == 1, (dialect, k, hits)


# ---- actions ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "dialect", "dtype", "action", "writes"),
    [
        # S1/S4: per-expert names and mlp -> ffn
        (
            "model.layers.0.mlp.experts.7.gate_proj.weight",
            "H",
            "U8",
            M.KEEP_NVFP4,
            ("layers.0.ffn.experts.7.w1.weight",),
        ),
        (
            "model.layers.0.mlp.experts.7.down_proj.weight_scale_2",
            "H",
            "F32",
            M.KEEP_NVFP4,
            ("layers.0.ffn.experts.7.w2.weight_scale_2",),
        ),
        (
            "model.layers.0.mlp.experts.7.up_proj.weight_scale_2",
            "H",
            "F32",
            M.UNIFY_W13,
            ("layers.0.ffn.experts.7.w3.weight_scale_2",),
        ),
        (
            "model.layers.0.mlp.experts.7.gate_proj.weight_scale",
            "H",
            "F8_E4M3",
            M.UNIFY_W13,
            ("layers.0.ffn.experts.7.w1.weight_scale",),
        ),
        (
            "model.layers.0.mlp.experts.7.up_proj.input_scale",
            "H",
            "F32",
            M.KEEP_NVFP4,
            ("layers.0.ffn.experts.7.w3.input_scale",),
        ),
        # S5: a compressor's activation scale has no parameter in vLLM
        ("model.layers.1.self_attn.compressor.kv_proj.input_scale", "H", "F32", M.DROP, ()),
        # S7/S15: compressor NVFP4 -> BF16; its scales are operands
        (
            "model.layers.1.self_attn.compressor.gate_proj.weight",
            "H",
            "U8",
            M.NVFP4_TO_BF16,
            ("layers.1.attn.compressor.wgate.weight",),
        ),
        ("model.layers.1.self_attn.compressor.gate_proj.weight_scale", "H", "F8_E4M3", M.NVFP4_TO_BF16, ()),
        # S9: the compressor's kv_norm is compressor.norm, never the attention's kv_norm
        (
            "model.layers.1.self_attn.compressor.kv_norm.weight",
            "H",
            "BF16",
            M.COPY,
            ("layers.1.attn.compressor.norm.weight",),
        ),
        (
            "model.layers.1.self_attn.compressor.indexer.kv_norm.weight",
            "H",
            "F32",
            M.CAST,
            ("layers.1.attn.indexer.compressor.norm.weight",),
        ),
        ("model.layers.1.self_attn.kv_norm.weight", "H", "BF16", M.COPY, ("layers.1.attn.kv_norm.weight",)),
        # S10: position_bias is ape, a trained weight (F32 in the release)
        (
            "model.layers.1.self_attn.compressor.position_bias",
            "H",
            "F32",
            M.COPY,
            ("layers.1.attn.compressor.ape",),
        ),
        # S12: lm_head -> head (vLLM adds lm_head itself)
        ("lm_head.weight", "H", "BF16", M.COPY, ("head.weight",)),
        # S13.5: o_a_proj left BF16 by ModelOpt -> FP8 block with a tile scale
        (
            "model.layers.0.self_attn.o_a_proj.weight",
            "H",
            "BF16",
            M.BF16_TO_FP8,
            ("layers.0.attn.wo_a.weight", "layers.0.attn.wo_a.scale"),
        ),
        # attention / shared experts NVFP4 -> FP8 block
        (
            "model.layers.0.self_attn.q_a_proj.weight",
            "H",
            "U8",
            M.NVFP4_TO_FP8,
            ("layers.0.attn.wq_a.weight", "layers.0.attn.wq_a.scale"),
        ),
        ("model.layers.0.self_attn.q_a_proj.weight_scale_2", "H", "F32", M.NVFP4_TO_FP8, ()),
        ("model.layers.0.self_attn.q_a_proj.input_scale", "H", "F32", M.DROP, ()),
        (
            "model.layers.0.mlp.shared_experts.down_proj.weight",
            "H",
            "U8",
            M.NVFP4_TO_FP8,
            ("layers.0.ffn.shared_experts.w2.weight", "layers.0.ffn.shared_experts.w2.scale"),
        ),
        (
            "model.layers.1.self_attn.compressor.indexer.scorer.weights_proj.weight",
            "H",
            "U8",
            M.NVFP4_TO_BF16,
            ("layers.1.attn.indexer.weights_proj.weight",),
        ),
        (
            "model.layers.1.self_attn.compressor.indexer.q_b_proj.weight",
            "H",
            "U8",
            M.NVFP4_TO_FP8,
            ("layers.1.attn.indexer.wq_b.weight", "layers.1.attn.indexer.wq_b.scale"),
        ),
        # X: attn.norm -> attn.kv_norm, float32 norms cast to the release's BF16
        ("model.layers.2.attn.norm.weight", "X", "F32", M.CAST, ("layers.2.attn.kv_norm.weight",)),
        ("model.layers.2.attn_norm.weight", "X", "F32", M.CAST, ("layers.2.attn_norm.weight",)),
        ("model.layers.2.hc_attn_fn", "X", "F32", M.COPY, ("layers.2.hc_attn_fn",)),
        ("model.hc_head.hc_scale", "X", "F32", M.COPY, ("hc_head_scale",)),
        ("head.weight", "X", "BF16", M.COPY, ("head.weight",)),
        ("model.layers.0.ffn.gate.tid2eid", "X", "I64", M.COPY, ("layers.0.ffn.gate.tid2eid",)),
        # N: the release's FP8 and MTP
        ("layers.0.attn.wq_a.weight", "N", "F8_E4M3", M.COPY, ("layers.0.attn.wq_a.weight",)),
        ("layers.0.attn.wq_a.scale", "N", "F8_E8M0", M.COPY, ("layers.0.attn.wq_a.scale",)),
        ("mtp.0.e_proj.weight", "N", "F8_E4M3", M.COPY, ("mtp.0.e_proj.weight",)),
        ("layers.0.ffn.experts.3.w2.weight", "N", "I8", M.DROP, ()),
    ],
    ids=lambda v: v if isinstance(v, str) and "." in v else None,
)
def test_action(key, dialect, dtype, action, writes):
    m = M.map_key(key, dialect, dtype)
    assert (m.action, m.writes) == (action, writes), m
    assert m.reason


def test_unquantized_routed_expert_is_an_error():
    with pytest.raises(M.MappingError, match=r"experts\.0\.w1\.weight.*NVFP4"):
        M.map_key("model.layers.0.mlp.experts.0.gate_proj.weight", "H", "BF16")
    with pytest.raises(M.MappingError, match=r"experts\.0\.w1\.weight.*NVFP4"):
        M.map_key("model.layers.0.ffn.experts.0.w1.weight", "X", "BF16")


def test_hf_ptq_mtp_experts_are_quantized_and_the_rest_of_mtp_maps_natively():
    """hf_ptq re-attaches the MTP block from the BF16 source under native names (seen on a GPU run):
    its experts get NVFP4 (weight and both scales; input_scale is the converter's fallback)."""
    m = M.map_key("mtp.0.ffn.experts.3.w1.weight", "X", "BF16", (128, 256))
    assert (m.rule, m.action) == ("x.mtp", M.BF16_TO_NVFP4)
    assert m.writes == tuple(
        f"mtp.0.ffn.experts.3.w1.{s}" for s in ("weight", "weight_scale", "weight_scale_2")
    )
    assert M.map_key("mtp.0.attn.wq_a.weight", "X", "BF16").action == M.BF16_TO_FP8
    assert M.map_key("mtp.0.e_proj.weight", "X", "BF16").writes == (
        "mtp.0.e_proj.weight",
        "mtp.0.e_proj.scale",
    )
    # the real hf_ptq export had the MTP attention's kv_norm as attn.norm, like the layers' (GPU run)
    assert M.map_key("mtp.0.attn.norm.weight", "X", "BF16").target == "mtp.0.attn.kv_norm.weight"


def test_names_only_without_dtype():
    m = M.map_key("model.layers.0.mlp.experts.0.gate_proj.weight", "H")
    assert (m.target, m.action, m.rule) == ("layers.0.ffn.experts.0.w1.weight", None, "h.expert.gate_proj")


# ---- errors: never a silent skip ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "dialect", "nearest"),
    [
        ("model.layers.0.self_attn.q_a_projj.weight", "H", "h.attn.q_a_proj"),
        ("model.layers.0.mlp.experts.gate_up_proj", "H", "h.expert.gate_proj"),  # fused 3-D experts
        ("model.layers.0.mlp.experts.0.gate_projection.weight", "H", "h.expert.gate_proj"),
        ("model.layers.1.self_attn.compressor.position_bias_2", "H", "h.compressor.position_bias"),
        ("model.layers.0.attn.wq_c.weight", "X", "x.block"),
        ("model.lm_head.weight", "H", "h.lm_head"),
        ("layers.0.attn.compressor.wkv.bias", "N", "n.block"),
        ("mtp.0.e_proj_2.weight", "N", "n.mtp"),
        ("vision.tower.weight", "N", "n.top"),
    ],
)
def test_unmapped_key_names_the_nearest_rule(key, dialect, nearest):
    with pytest.raises(M.UnmappedKeyError) as err:
        M.map_key(key, dialect, "BF16")
    assert err.value.nearest.name == nearest
    assert key in str(err.value) and f"nearest rule: {nearest}" in str(err.value)


def test_wrong_dialect_is_named():
    with pytest.raises(M.UnmappedKeyError, match="it is a dialect X key"):
        M.map_key("model.layers.0.attn.wq_a.weight", "H", "BF16")


def test_detect_dialect_refuses_a_mixture():
    with pytest.raises(M.MappingError, match=r"closest is H .*model\.layers\.0\.attn\.wq_a\.weight"):
        M.detect_dialect(["model.layers.0.self_attn.q_a_proj.weight", "model.layers.0.attn.wq_a.weight"])
    with pytest.raises(M.MappingError, match="alike"):
        M.detect_dialect(["model.norm.weight"])


def test_plan_names_missing_duplicated_and_misshapen_keys():
    config = tiny_config("micro")
    tensors = _fixture("mapping_x_micro_full.json")
    drop = "model.layers.2.attn.wq_b.weight"
    tensors = [t for t in tensors if t[0] != drop]
    tensors.append(("model.layers.0.attn.kv_norm.weight", "F32", (64,)))  # same target as attn.norm
    tensors = [(k, d, (3, 3)) if k == "model.layers.1.attn.wkv.weight" else (k, d, s) for k, d, s in tensors]
    with pytest.raises(M.MappingError) as err:
        M.plan(tensors, config)
    msg = str(err.value)
    assert "layers.2.attn.wq_b.weight" in msg and "layers.2.attn.wq_b.scale" in msg  # missing
    assert (
        "layers.0.attn.kv_norm.weight: written by 2 source keys: model.layers.0.attn.kv_norm.weight, "
        "model.layers.0.attn.norm.weight"
    ) in msg
    assert "model.layers.1.attn.wkv.weight: shape [3, 3]" in msg and "needs [64, 128]" in msg


def test_plan_names_a_missing_nvfp4_operand():
    config = tiny_config("micro")
    tensors = [
        t for t in _fixture("mapping_x_micro_full.json") if t[0] != "model.layers.1.attn.wq_b.weight_scale_2"
    ]
    with pytest.raises(
        M.MappingError,
        match=r"model\.layers\.1\.attn\.wq_b\.weight: nvfp4->fp8-block needs "
        r"model\.layers\.1\.attn\.wq_b\.weight_scale_2",
    ):
        M.plan(tensors, config)


def test_plan_names_a_copy_of_the_wrong_dtype():
    config = tiny_config("micro")
    tensors = [(k, "F32" if k == "layers.0.attn.wq_a.scale" else d, s) for k, d, s in _triples(config)]
    with pytest.raises(M.MappingError, match=r"layers\.0\.attn\.wq_a\.scale: F32, but copy .* needs F8_E8M0"):
        M.plan(tensors, config)


def _triples(config):
    return [(t.key, t.dtype, t.shape) for t in M.target_tensors(config)]


def test_plan_rejects_a_key_of_a_block_the_config_lacks():
    config = tiny_config("micro")
    tensors = [*M.target_tensors(config), ("layers.2.attn.compressor.ape", "F32", (4, 128))]  # sliding layer
    with pytest.raises(M.MappingError, match=r"layers\.2\.attn\.compressor\.ape.*does not have"):
        M.plan(tensors, config)


# ---- snapshots: per-key tables for the micro model ------------------------------------------------


def test_snapshot_micro_native(json_snapshot):
    config = tiny_config("micro")
    assert snapshot_rows(M.plan(M.target_tensors(config), config), config) == json_snapshot


@pytest.mark.parametrize("recipe", ["full", "experts"])
def test_snapshot_micro_real_x_export(recipe, json_snapshot):
    config = tiny_config("micro")
    assert snapshot_rows(M.plan(_fixture(f"mapping_x_micro_{recipe}.json"), config), config) == json_snapshot


def test_snapshot_micro_h_full(json_snapshot):
    config = tiny_config("micro")
    assert snapshot_rows(M.plan(export_tensors(config, "full", "H"), config), config) == json_snapshot


def test_snapshot_rule_table(json_snapshot):
    table = [
        {"rule": r.name, "dialects": list(r.dialects), "pattern": r.pattern, "target": r.target}
        for r in M.RULES
    ]
    actions = [f"{a.form} x {a.target_fmt} -> {a.action} ({a.writes})" for a in M.ACTIONS]
    assert {"rules": table, "actions": actions} == json_snapshot
