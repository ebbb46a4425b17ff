"""pipeline/vllm_config/ and `dsv4 fix-config`: the config.json rewrites vLLM needs, as data, idempotent.

Fixtures (fixtures/*.json), each the DeepSeek V4 Pro config as an export writes it:

* ``seeds_export_config.json`` — the seeds' ModelOpt 0.45.0.dev64 + transformers 5.8.0 export
  (seeds/000 "Model Config Patches"). Built from what the seeds describe, on transformers 5.23's
  serialisation of the release config (the closest DeepseekV4Config available here; 5.8's own output was
  never recorded):
  - ``layer_types`` + ``compress_rates`` (+ ``mlp_layer_types``) and no ``compress_ratios``/
    ``num_hash_layers``: seeds patch 1 ("transformers 5.8.0 renamed to compress_rates dict"); the values
    are what transformers derives from the release's compress_ratios/num_hash_layers.
  - ``rope_parameters = {"main": ..., "compress": ...}``: seeds patch 3; contents as transformers 5.23
    nests them (YaRN under ``compress``, ``main`` plain rope; an assumption for 5.8).
  - ``rope_scaling`` nested the same way: seeds patch 4 ("Nested dict ... (same as above)").
  - ``quantization_config``: ModelOpt's ``convert_hf_quant_config_format`` (0.47 code; the seeds say
    0.45's has "same schema" as NVIDIA's MiniMax-M2.7-NVFP4) of an NVFP4 hf_quant_config with producer
    0.45.0.dev64 and ``kv_cache_quant_algo: FP8`` (the seeds' ``kv_cache_qformat=fp8_cast``); no
    ``scale_fmt`` (seeds patch 2). The exclusions (lm_head, o_a_proj, router gate) are BRIEF §3's list
    of what ModelOpt leaves unquantized, in the seeds' (H) names.
  - ``transformers_version`` 5.8.0 (seeds).
* ``export_047_t523_config.json`` — ModelOpt 0.47 + transformers 5.23 (BRIEF §3 X, §5): transformers
  5.23's ``to_json_string(use_diff=True)`` of the release config (no ``rope_scaling`` at all, nested
  ``rope_parameters``) with the quantization_config 0.47's ``convert_hf_quant_config_format`` writes for
  an experts-only NVFP4 hf_quant_config (exclusions in the X dialect; kv cache not quantized).
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from syrupy.extensions.json import JSONSnapshotExtension

from harness.exports import as_transformers_export
from harness.markers import require_reference
from harness.tiny import tiny_config
from pipeline import cli
from pipeline.errors import DsV4Error
from pipeline.release_layout import MXFP4, release_weights
from pipeline.vllm_config import (
    ABSENT,
    HF_QUANT_CONFIG,
    MIXED_QUANT_CONFIG,
    RULES,
    TRANSFORMERS_DEFAULT_HASH_LAYERS,
    VLLM_TARGETS,
    dumps,
    fix_config,
    rule_table,
)
from pipeline.vllm_config.engine import short as _short

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "fixtures"
REFERENCE_CONFIG = ROOT.parent / "shared" / "reference" / "deepseek-v4-pro" / "config.json"
RELEASE_RATIOS = [128, 128, *([4, 128] * 29), 4, 0]  # the V4 Pro release's compress_ratios (62)
RELEASE_ROPE = {
    "beta_fast": 32,
    "beta_slow": 1,
    "factor": 16,
    "original_max_position_embeddings": 65536,
    "type": "yarn",
}
NVFP4_SUFFIXES = ("weight", "weight_scale", "weight_scale_2", "input_scale")


@pytest.fixture
def json_snapshot(snapshot):
    return snapshot.use_extension(JSONSnapshotExtension)


def load_fixture(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def reference_config() -> dict:
    require_reference("the real V4 Pro config.json")  # CI: fails, never skips
    return json.loads(REFERENCE_CONFIG.read_text())


def mixed_keys(config: dict) -> list[str]:
    """Tensor keys of the mixed layout for a release-style config: MXFP4 experts become NVFP4."""
    keys = []
    for w in release_weights(config):
        if w.fmt == MXFP4:
            keys += [f"{w.name}.{s}" for s in NVFP4_SUFFIXES]
        else:
            keys += [t.key for t in w.tensors()]
    return keys


@functools.cache
def pro_mixed_keys(n_layers: int = 61, n_experts: int = 384) -> tuple[str, ...]:
    """The V4 Pro's NVFP4 expert keys (61 layers + MTP) plus a few FP8/BF16 neighbours (built once)."""
    keys = ["embed.weight", "head.weight", "layers.0.attn.wq_a.weight", "layers.0.attn.wq_a.scale"]
    for prefix in [f"layers.{i}" for i in range(n_layers)] + ["mtp.0"]:
        for e in range(n_experts):
            for w in ("w1", "w2", "w3"):
                keys += [f"{prefix}.ffn.experts.{e}.{w}.{s}" for s in NVFP4_SUFFIXES]
    return tuple(keys)


def modelopt_quant_config(kv: bool = True) -> dict:
    """config.json's quantization_config as ModelOpt 0.47's convert_hf_quant_config_format writes it."""
    qc = {
        "config_groups": {
            "group_0": {
                "input_activations": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16},
                "weights": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16},
                "targets": ["Linear"],
            }
        },
        "ignore": ["lm_head"],
        "quant_algo": "NVFP4",
        "producer": {"name": "modelopt", "version": "0.47.0"},
        "quant_method": "modelopt",
    }
    if kv:
        qc["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"}
    return qc


def summary(result, full_hfq: bool) -> dict:
    hfq = result.hf_quant_config
    if hfq is not None and not full_hfq:
        # shallow copies down to the 71k-entry map, which is summarised rather than copied
        hfq = {**hfq, "quantization": dict(hfq["quantization"])}
        layers = hfq["quantization"]["quantized_layers"]
        names = list(layers)
        hfq["quantization"]["quantized_layers"] = {
            "count": len(names),
            "first": names[:3],
            "last": names[-3:],
            "values": sorted({json.dumps(v, sort_keys=True) for v in layers.values()}),
        }
    return {
        "changes": [
            {"rule": c.rule, "key": c.key, "before": _short(c.before), "after": _short(c.after)}
            for c in result.changes
        ],
        "config": result.config,
        "hf_quant_config": hfq,
    }


# ---- snapshots ------------------------------------------------------------------------------------


def test_rule_table_snapshot(json_snapshot):
    assert rule_table() == json_snapshot


@pytest.mark.parametrize("preset", ["micro", "vllm-shaped"])
@pytest.mark.parametrize("target", VLLM_TARGETS)
@pytest.mark.parametrize("shape", ["release", "transformers-export"])
def test_snapshot_tiny(preset, target, shape, json_snapshot):
    """Both tiny configs, as converted (release style) and as a transformers >= 5.8 + ModelOpt export."""
    config = tiny_config(preset)
    keys = mixed_keys(config)
    if shape == "transformers-export":
        config = as_transformers_export(config)
        config["quantization_config"] = modelopt_quant_config()
    result = fix_config(config, target=target, tensor_keys=keys)
    assert summary(result, full_hfq=True) == json_snapshot


# ---- the seeds' config failures, one test each -----------------------------------------------------


@pytest.mark.parametrize("target", VLLM_TARGETS)
def test_missing_compress_ratios_is_restored(target):
    """Seeds patch 1: the export had layer_types + compress_rates; vLLM 0.32 reads compress_ratios."""
    config = load_fixture("seeds_export_config.json")
    assert "compress_ratios" not in config
    out = fix_config(config, target=target, tensor_keys=pro_mixed_keys(2, 1)).config
    assert out["compress_ratios"] == RELEASE_RATIOS


def test_compress_ratios_match_the_real_release():
    derived = fix_config(load_fixture("export_047_t523_config.json"), tensor_keys=pro_mixed_keys(2, 1)).config
    assert derived["compress_ratios"] == reference_config()["compress_ratios"]


def test_compress_ratios_from_source_config():
    src = tiny_config("micro")
    config = as_transformers_export(src)
    del config["layer_types"], config["compress_rates"]
    with pytest.raises(DsV4Error, match=r"compress_ratios: missing.*--source-config"):
        fix_config(config)
    out = fix_config(config, source_config=src).config
    assert out["compress_ratios"] == src["compress_ratios"]


def test_compress_ratios_disagreeing_with_source_is_refused():
    src = tiny_config("micro")
    config = copy.deepcopy(src)
    config["compress_ratios"] = [4, 4, 0, 4, 0]
    with pytest.raises(DsV4Error, match=r"compress_ratios.*differs from"):
        fix_config(config, source_config=src)


def test_layer_types_disagreeing_with_compress_ratios_is_refused_for_033():
    """transformers' DeepseekV4Config (vLLM 0.33) follows layer_types over compress_ratios."""
    config = as_transformers_export(tiny_config("micro"))
    config["compress_ratios"] = [128, 128, 0, 4, 0]  # layer 1 is CSA in layer_types
    with pytest.raises(DsV4Error, match=r"layer_types: layer 1 .*compress_ratios\[1\] is 128"):
        fix_config(config, target="0.33")


@pytest.mark.parametrize("target", VLLM_TARGETS)
def test_missing_scale_fmt_is_added(target):
    """Seeds patch 2: ModelOpt never writes scale_fmt; vLLM reads it to turn on UE8M0 for DeepGEMM."""
    config = tiny_config("micro")
    del config["quantization_config"]["scale_fmt"]
    result = fix_config(config, target=target)
    assert result.config["quantization_config"]["scale_fmt"] == "ue8m0"
    assert [(c.rule, c.key, c.before, c.after) for c in result.changes] == [
        ("scale_fmt", "quantization_config.scale_fmt", ABSENT, "ue8m0")
    ]
    mixed = fix_config(
        load_fixture("seeds_export_config.json"), target=target, tensor_keys=pro_mixed_keys(2, 1)
    )
    assert mixed.config["quantization_config"]["scale_fmt"] == "ue8m0"


@pytest.mark.parametrize("target", VLLM_TARGETS)
def test_nested_rope_is_flattened_from_the_yarn_subdict(target):
    """Seeds patches 3-4: nested rope_parameters/rope_scaling. The flat dict must carry YaRN, which
    transformers nests under 'compress' ('main' is plain rope: flattening it, as the seeds did, loses
    YaRN on every compressed layer)."""
    config = load_fixture("seeds_export_config.json")
    assert config["rope_parameters"]["main"]["rope_type"] == "default"
    out = fix_config(config, target=target, tensor_keys=pro_mixed_keys(2, 1)).config
    assert out["rope_scaling"] == RELEASE_ROPE
    assert "rope_parameters" not in out
    assert (out["rope_theta"], out["compress_rope_theta"]) == (10000, 160000)


def test_rope_from_047_export_without_rope_scaling():
    out = fix_config(load_fixture("export_047_t523_config.json"), tensor_keys=pro_mixed_keys(2, 1)).config
    assert out["rope_scaling"] == RELEASE_ROPE == reference_config()["rope_scaling"]


def test_rope_thetas_restored_from_nested_params():
    config = as_transformers_export(tiny_config("micro"))
    del config["rope_theta"], config["compress_rope_theta"]
    out = fix_config(config).config
    assert (out["rope_theta"], out["compress_rope_theta"]) == (10000, 160000)


def test_vllm_032_reads_are_satisfied():
    """What vLLM 0.32's DeepseekV4 model reads from the config (see pipeline/vllm_config/)."""
    config = as_transformers_export(tiny_config("micro"))
    del config["qk_rope_head_dim"]
    out = fix_config(config, target="0.32").config
    assert out["compress_ratios"] == tiny_config("micro")["compress_ratios"]
    assert out["num_hash_layers"] == 2
    assert out["qk_rope_head_dim"] == 16
    assert "mlp_layer_types" not in out  # transformers 5.19 (vLLM 0.32) rejects hash_moe/moe values
    out33 = fix_config(config, target="0.33").config
    assert out33["mlp_layer_types"] == config["mlp_layer_types"]  # vLLM 0.33 reads it
    assert "num_hash_layers" not in out33


def test_hash_layers_are_never_left_to_transformers_default():
    """transformers' DeepseekV4Config (vLLM 0.33) assumes its default hash layer count when a config has
    neither mlp_layer_types nor num_hash_layers: the fix restores num_hash_layers from the source, or
    refuses. The micro model's count differs from that default, so a silent default would show."""
    src = tiny_config("micro")
    assert src["num_hash_layers"] != TRANSFORMERS_DEFAULT_HASH_LAYERS
    config = as_transformers_export(src)
    del config["mlp_layer_types"]
    with pytest.raises(DsV4Error, match=r"num_hash_layers: missing.*would silently assume 3 hash layers"):
        fix_config(config, target="0.33")
    assert fix_config(config, target="0.33", source_config=src).config["num_hash_layers"] == 2


def test_hash_layers_disagreeing_for_033_are_refused():
    """transformers follows mlp_layer_types over num_hash_layers, so the two, and the source, must agree."""
    src = tiny_config("micro")
    config = as_transformers_export(src)
    config["num_hash_layers"] = 1
    with pytest.raises(DsV4Error, match=r"num_hash_layers: 1 disagrees with mlp_layer_types \(2 hash"):
        fix_config(config, target="0.33")
    del config["num_hash_layers"]
    config["mlp_layer_types"][1] = "moe"  # one hash layer, the micro model has two
    with pytest.raises(DsV4Error, match=r"mlp_layer_types: has 1 hash_moe layers, source config has 2"):
        fix_config(config, target="0.33", source_config=src)
    without_source = fix_config(config, target="0.33").config  # taken as written
    assert (
        without_source["mlp_layer_types"] == config["mlp_layer_types"]
        and "num_hash_layers" not in without_source
    )


# ---- the mixed layout and hf_quant_config.json ------------------------------------------------------


@pytest.mark.parametrize("target", VLLM_TARGETS)
def test_mixed_layout_quant_config(target):
    config = tiny_config("vllm-shaped")
    result = fix_config(config, target=target, tensor_keys=mixed_keys(config))
    assert result.config["quantization_config"] == MIXED_QUANT_CONFIG
    q = result.hf_quant_config["quantization"]
    assert result.hf_quant_config["producer"]["name"] == "modelopt"
    assert q["quant_algo"] == "MIXED_PRECISION"
    layers = q["quantized_layers"]
    # native names, every routed expert of every layer and the MTP block, nothing else
    expected = [
        f"{p}.ffn.experts.{e}.{w}"
        for p in ("layers.0", "layers.1", "mtp.0")
        for e in range(config["n_routed_experts"])
        for w in ("w1", "w2", "w3")
    ]
    assert list(layers) == expected
    assert set(map(json.dumps, layers.values())) == {json.dumps({"quant_algo": "NVFP4", "group_size": 16})}


def test_release_checkpoint_keeps_its_quant_config():
    config = tiny_config("micro")
    keys = [t.key for w in release_weights(config) for t in w.tensors()]
    result = fix_config(config, tensor_keys=keys)
    assert result.changes == () and result.hf_quant_config is None


def test_hf_quant_config_keeps_export_producer_and_kv_cache():
    config = as_transformers_export(tiny_config("micro"))
    config["quantization_config"] = modelopt_quant_config(kv=True)
    hfq = fix_config(config, tensor_keys=mixed_keys(tiny_config("micro"))).hf_quant_config
    assert hfq["producer"] == {"name": "modelopt", "version": "0.47.0"}
    assert hfq["quantization"]["kv_cache_quant_algo"] == "FP8"


@pytest.mark.parametrize(
    "bad_key, match",
    [
        ("model.layers.0.mlp.experts.0.gate_proj.weight_scale_2", "not a routed expert in the native layout"),
        ("layers.0.ffn.shared_experts.w1.weight_scale_2", "not a routed expert"),
        ("layers.0.attn.wq_a.weight_scale_2", "not a routed expert"),
    ],
)
def test_nvfp4_outside_native_routed_experts_is_refused(bad_key, match):
    config = tiny_config("micro")
    stem = bad_key[: -len(".weight_scale_2")]
    keys = mixed_keys(config) + [f"{stem}.{s}" for s in NVFP4_SUFFIXES]
    with pytest.raises(DsV4Error, match=match):
        fix_config(config, tensor_keys=keys)


def test_half_converted_experts_are_refused():
    config = tiny_config("micro")
    keys = [*mixed_keys(config), "layers.3.ffn.experts.1.w2.scale"]
    with pytest.raises(DsV4Error, match="MXFP4 expert scale next to NVFP4"):
        fix_config(config, tensor_keys=keys)


def test_modelopt_config_without_nvfp4_tensors_is_refused():
    config = tiny_config("micro")
    config["quantization_config"] = modelopt_quant_config()
    with pytest.raises(DsV4Error, match="no NVFP4 weights"):
        fix_config(config, tensor_keys=["embed.weight"])
    with pytest.raises(DsV4Error, match=r"tensor list .* is needed"):
        fix_config(config)


# ---- input validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda c: c.pop("num_hidden_layers"), "key num_hidden_layers: missing"),
        (
            lambda c: c.update(compress_ratios=c["compress_ratios"][:-1]),
            "key compress_ratios: has 4 entries, expected num_hidden_layers \\+ num_nextn_predict_layers = 5",
        ),
        (lambda c: c.update(compress_ratios=[128, 4, 0, 4, 2]), "ratios \\[2\\] are not among"),
        (lambda c: c.pop("rope_scaling"), "key rope_scaling: no yarn rope parameters found"),
        (lambda c: c["rope_scaling"].pop("beta_fast"), "key rope_scaling: no yarn|lack beta_fast"),
    ],
)
def test_bad_inputs_name_file_and_key(mutate, match):
    config = tiny_config("micro")
    mutate(config)
    with pytest.raises(DsV4Error, match=f"^ckpt/config.json: .*{match}|^ckpt/config.json: key .*{match}"):
        fix_config(config, where="ckpt/config.json")


def test_unknown_target_is_refused():
    with pytest.raises(DsV4Error, match=r"not one of 0\.32, 0\.33"):
        fix_config(tiny_config("micro"), target="0.31")


def test_inputs_are_not_modified():
    config = load_fixture("seeds_export_config.json")
    before = copy.deepcopy(config)
    fix_config(config, tensor_keys=pro_mixed_keys(2, 1))
    assert config == before


def test_every_rule_is_documented():
    names = [r.name for r in RULES]
    assert len(names) == len(set(names))
    for r in RULES:
        assert r.keys and r.reason and set(r.versions) <= set(VLLM_TARGETS)


# ---- idempotence -----------------------------------------------------------------------------------


def _twice(config: dict, target: str, keys: list[str] | None):
    first = fix_config(config, target=target, tensor_keys=keys)
    second = fix_config(first.config, target=target, tensor_keys=keys, hf_quant_config=first.hf_quant_config)
    return first, second


@pytest.mark.parametrize("target", VLLM_TARGETS)
@pytest.mark.parametrize("name", ["seeds_export_config.json", "export_047_t523_config.json"])
def test_idempotent_on_fixtures(name, target):
    first, second = _twice(load_fixture(name), target, pro_mixed_keys(3, 2))
    assert first.changes and second.changes == ()
    assert dumps(second.config) == dumps(first.config)
    assert dumps(second.hf_quant_config) == dumps(first.hf_quant_config)


@st.composite
def export_like_configs(draw):
    """Release-style tiny configs with random layer kinds, pushed through any subset of the export
    transformations the seeds and transformers >= 5.8 apply."""
    c = tiny_config(draw(st.sampled_from(["micro", "vllm-shaped"])))
    n = draw(st.integers(1, 5))
    c["num_hidden_layers"] = n
    c["num_hash_layers"] = draw(st.integers(0, n))
    c["compress_ratios"] = [*draw(st.lists(st.sampled_from([0, 4, 128]), min_size=n, max_size=n)), 0]
    if draw(st.booleans()):
        c = as_transformers_export(c)
        if draw(st.booleans()):
            c["rope_scaling"] = copy.deepcopy(c["rope_parameters"])  # the seeds' nested rope_scaling
        if draw(st.booleans()):
            c["compress_ratios"] = [
                {"sliding_attention": 0, "compressed_sparse_attention": 4}.get(t, 128)
                for t in c["layer_types"]
            ] + [0]
    quant = draw(st.sampled_from(["release", "release-no-scale-fmt", "modelopt", "mixed"]))
    keys = None
    if quant == "release-no-scale-fmt":
        del c["quantization_config"]["scale_fmt"]
    elif quant in ("modelopt", "mixed"):
        experts = draw(st.integers(1, 3))
        prefixes = [f"layers.{i}" for i in range(n)] + ["mtp.0"]
        keys = [
            f"{p}.ffn.experts.{e}.{w}.{s}"
            for p in prefixes
            for e in range(experts)
            for w in ("w1", "w2", "w3")
            for s in NVFP4_SUFFIXES
        ]
        if quant == "modelopt":
            c["quantization_config"] = modelopt_quant_config(kv=draw(st.booleans()))
        else:
            c["quantization_config"] = copy.deepcopy(MIXED_QUANT_CONFIG)
    return c, keys


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=export_like_configs(), target=st.sampled_from(VLLM_TARGETS))
def test_fix_config_is_idempotent_property(case, target):
    config, keys = case
    first, second = _twice(config, target, keys)
    assert second.changes == ()
    assert dumps(second.config) == dumps(first.config)
    out = first.config
    # what vLLM reads is in place whatever shape came in
    assert len(out["compress_ratios"]) == out["num_hidden_layers"] + 1
    assert out["rope_scaling"] == RELEASE_ROPE and "rope_parameters" not in out
    assert out["quantization_config"]["scale_fmt"] == "ue8m0"
    assert (out["quantization_config"] == MIXED_QUANT_CONFIG) == (keys is not None)
    if target == "0.32":
        assert "mlp_layer_types" not in out and isinstance(out["num_hash_layers"], int)


# ---- the command -------------------------------------------------------------------------------------


def _write_ckpt(path: Path, config: dict, keys: list[str]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=4))
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {k: "model-00001-of-00001.safetensors" for k in keys}})
    )
    return path


def _seeds_ckpt(tmp_path: Path) -> Path:
    return _write_ckpt(tmp_path / "ckpt", load_fixture("seeds_export_config.json"), pro_mixed_keys(2, 2))


@pytest.mark.parametrize("target", VLLM_TARGETS)
def test_command_rewrites_backs_up_and_is_idempotent(tmp_path, capsys, target):
    ckpt = _seeds_ckpt(tmp_path)
    original = (ckpt / "config.json").read_bytes()
    assert cli.main(["fix-config", str(ckpt), "--target-vllm", target]) == 0
    out = capsys.readouterr().out
    assert "[compress_ratios] compress_ratios: <absent> -> [128, 128, 4, 128, ... (62 items)]" in out
    assert "why: " in out
    assert (ckpt / "config.json.orig").read_bytes() == original
    fixed = (ckpt / "config.json").read_bytes()
    hfq = json.loads((ckpt / HF_QUANT_CONFIG).read_text())
    assert hfq["quantization"]["quant_algo"] == "MIXED_PRECISION"
    assert (
        json.loads(fixed)
        == fix_config(
            load_fixture("seeds_export_config.json"), target=target, tensor_keys=pro_mixed_keys(2, 2)
        ).config
    )
    assert not list(ckpt.glob(".*.partial"))

    assert cli.main(["fix-config", str(ckpt), "--target-vllm", target]) == 0
    assert "unchanged: already fixed" in capsys.readouterr().out
    assert (ckpt / "config.json").read_bytes() == fixed
    assert (ckpt / "config.json.orig").read_bytes() == original


def test_command_dry_run_writes_nothing(tmp_path, capsys):
    ckpt = _seeds_ckpt(tmp_path)
    before = sorted((p.name, p.read_bytes()) for p in ckpt.iterdir())
    assert cli.main(["fix-config", str(ckpt), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would change" in out and "dry run: nothing written" in out
    assert sorted((p.name, p.read_bytes()) for p in ckpt.iterdir()) == before


def test_command_json(tmp_path, capsys):
    ckpt = _seeds_ckpt(tmp_path)
    assert cli.main(["fix-config", str(ckpt), "--dry-run", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["changed"] and report["written"] == []
    assert {c["rule"] for c in report["changes"]} >= {"quant_layout", "compress_ratios", "rope_scaling"}
    assert any(c["key"] == "compress_ratios" and c["before"] == "<absent>" for c in report["changes"])


def test_command_source_config(tmp_path, capsys):
    src = tiny_config("micro")
    config = as_transformers_export(src)
    del config["layer_types"], config["compress_rates"]
    ckpt = _write_ckpt(tmp_path / "ckpt", config, ["embed.weight"])
    (tmp_path / "src.json").write_text(json.dumps(src))
    assert cli.main(["fix-config", str(ckpt)]) == 2
    assert "compress_ratios: missing" in capsys.readouterr().err
    assert cli.main(["fix-config", str(ckpt), "--source-config", str(tmp_path / "src.json")]) == 0
    assert json.loads((ckpt / "config.json").read_text())["compress_ratios"] == src["compress_ratios"]
    assert not (ckpt / HF_QUANT_CONFIG).exists()


@pytest.mark.parametrize(
    "setup, match",
    [
        (lambda d: None, "config.json: no config.json there"),
        (lambda d: (d / "config.json").write_text("{not json"), "config.json: cannot parse JSON"),
        (lambda d: (d / "config.json").write_text("[1]"), "config.json: expected a JSON object"),
    ],
)
def test_command_bad_config_file(tmp_path, capsys, setup, match):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    setup(ckpt)
    assert cli.main(["fix-config", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert match in err and str(ckpt) in err


def test_command_validation_error_writes_nothing(tmp_path, capsys):
    config = tiny_config("micro")
    config["compress_ratios"] = config["compress_ratios"][:-1]
    del config["quantization_config"]["scale_fmt"]
    ckpt = _write_ckpt(tmp_path / "ckpt", config, ["embed.weight"])
    before = (ckpt / "config.json").read_bytes()
    assert cli.main(["fix-config", str(ckpt)]) == 2
    assert "key compress_ratios: has 4 entries" in capsys.readouterr().err
    assert (ckpt / "config.json").read_bytes() == before and not (ckpt / "config.json.orig").exists()


def test_command_backs_up_an_existing_hf_quant_config(tmp_path, capsys):
    ckpt = _seeds_ckpt(tmp_path)
    export_hfq = {
        "producer": {"name": "modelopt", "version": "0.45.0.dev64"},
        "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": "FP8", "group_size": 16},
    }
    (ckpt / HF_QUANT_CONFIG).write_text(json.dumps(export_hfq, indent=4))
    original = (ckpt / HF_QUANT_CONFIG).read_bytes()
    assert cli.main(["fix-config", str(ckpt)]) == 0
    assert (ckpt / (HF_QUANT_CONFIG + ".orig")).read_bytes() == original
    hfq = json.loads((ckpt / HF_QUANT_CONFIG).read_text())
    assert hfq["producer"] == export_hfq["producer"]
    assert hfq["quantization"]["kv_cache_quant_algo"] == "FP8"
    assert hfq["quantization"]["quant_algo"] == "MIXED_PRECISION"
    assert cli.main(["fix-config", str(ckpt)]) == 0
    assert "unchanged: already fixed" in capsys.readouterr().out


@pytest.mark.parametrize("target", VLLM_TARGETS)
def test_command_on_a_tiny_release_checkpoint_changes_nothing(tmp_path, capsys, target):
    """The release layout (real index, real shards) is already what both vLLM versions read."""
    from harness.tiny import build_tiny_release

    ckpt = tmp_path / "tiny"
    build_tiny_release(ckpt, "micro", 0)
    before = (ckpt / "config.json").read_bytes()
    assert cli.main(["fix-config", str(ckpt), "--target-vllm", target]) == 0
    assert "unchanged: already fixed" in capsys.readouterr().out
    assert (ckpt / "config.json").read_bytes() == before
    assert not (ckpt / "config.json.orig").exists() and not (ckpt / HF_QUANT_CONFIG).exists()
