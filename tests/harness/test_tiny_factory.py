"""The tiny-checkpoint factory (harness/tiny.py): exactly the release layout's tensors for its config,
with the release's dtypes and shapes, every block kind in the micro preset, sane values, and
byte-identical output for the same preset and seed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from harness.markers import require_reference
from harness.tiny import INDEX_NAME, PRESETS, build_tiny_release, tiny_config
from pipeline.formats import fp8_block_dequantize, mxfp4_dequantize, ue8m0_decode
from pipeline.release_layout import FP8, MXFP4, layer_kind, release_tensors, release_weights

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
REFERENCE_CONFIG = ROOT.parent / "shared" / "reference" / "deepseek-v4-pro" / "config.json"
DTYPES = {
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E8M0": torch.float8_e8m0fnu,
    "I8": torch.int8,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "I64": torch.int64,
}


@pytest.fixture(scope="module", params=PRESETS)
def built(request, tmp_path_factory) -> tuple[str, Path]:
    preset = request.param
    return preset, build_tiny_release(tmp_path_factory.mktemp(preset), preset, seed=0)


def _read(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open objects are not iterable
                assert key not in out, f"{key} is in two shards"
                out[key] = f.get_tensor(key)
    return out


def test_tensors_are_exactly_the_release_layout(built):
    preset, path = built
    config = json.loads((path / "config.json").read_text())
    assert config == tiny_config(preset)
    tensors = _read(path)
    specs = {t.key: t for t in release_tensors(config)}
    assert tensors.keys() == specs.keys()
    wrong = {
        k: (tensors[k].dtype, tuple(tensors[k].shape), s.dtype, s.shape)
        for k, s in specs.items()
        if tensors[k].dtype != DTYPES[s.dtype] or tuple(tensors[k].shape) != s.shape
    }
    assert wrong == {}


def test_index_maps_every_key_to_its_shard(built):
    _, path = built
    index = json.loads((path / INDEX_NAME).read_text())
    by_file: dict[str, set[str]] = {}
    for key, name in index["weight_map"].items():
        by_file.setdefault(name, set()).add(key)
    shards = sorted(p.name for p in path.glob("*.safetensors"))
    assert sorted(by_file) == shards and len(shards) > 1
    for name, keys in by_file.items():
        with safe_open(path / name, "pt") as f:
            assert set(f.keys()) == keys
    total = sum(t.numel() * t.element_size() for t in _read(path).values())
    assert index["metadata"]["total_size"] == total


def test_config_is_in_the_release_style():
    for preset in PRESETS:
        c = tiny_config(preset)
        assert c["architectures"] == ["DeepseekV4ForCausalLM"] and c["model_type"] == "deepseek_v4"
        assert c["quantization_config"] == {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "scale_fmt": "ue8m0",
            "weight_block_size": [128, 128],
        }
        assert c["rope_scaling"]["type"] == "yarn" and "rope_parameters" not in c  # flat, as vLLM reads it
        assert len(c["compress_ratios"]) == c["num_hidden_layers"] + c["num_nextn_predict_layers"]
        assert set(c["compress_ratios"]) <= {0, 4, 128}  # transformers 5.23 maps only these
        assert c["num_attention_heads"] % c["o_groups"] == 0
        assert c["num_hash_layers"] >= 1
        assert tiny_config(preset) is not tiny_config(preset)  # a fresh dict each call


def test_config_has_the_real_release_keys():
    require_reference("the check of the embedded release config against the real one")
    real = json.loads(REFERENCE_CONFIG.read_text())
    from harness.tiny import _RELEASE_CONFIG

    # bench/convert.py uses this copy where ../shared is absent (a GPU machine)
    assert real == _RELEASE_CONFIG
    for preset in PRESETS:
        assert list(tiny_config(preset)) == list(real)
        assert tiny_config(preset)["quantization_config"] == real["quantization_config"]
        assert tiny_config(preset)["rope_scaling"] == real["rope_scaling"]


def test_micro_covers_every_block_kind(tmp_path):
    c = tiny_config("micro")
    blocks = c["num_hidden_layers"] + c["num_nextn_predict_layers"]
    kinds = [layer_kind(c, b) for b in range(blocks)]
    assert kinds == ["hca", "csa", "sliding", "csa", "sliding"]  # the last is the MTP block
    keys = {t.key for t in release_tensors(c)}
    hash_layers = [i for i in range(c["num_hidden_layers"]) if f"layers.{i}.ffn.gate.tid2eid" in keys]
    assert hash_layers == list(range(c["num_hash_layers"])) == [0, 1]  # a hash HCA and a hash CSA layer
    assert "layers.3.ffn.gate.bias" in keys and "layers.3.attn.indexer.wq_b.weight" in keys
    assert "layers.0.attn.compressor.ape" in keys and "layers.0.attn.indexer.wq_b.weight" not in keys
    assert not any(k.startswith("layers.2.attn.compressor") for k in keys)
    assert {"mtp.0.e_proj.weight", "mtp.0.h_proj.scale", "mtp.0.hc_head_fn"} <= keys


def test_fp8_dims_suit_transformers_and_vllm():
    """transformers 5.23 takes an FP8 tile as rows // scale_rows, so a dim above 128 that is not a
    multiple of 128 would dequantize wrongly there; vllm-shaped keeps every FP8 dim 128-aligned."""
    for preset in PRESETS:
        for w in release_weights(tiny_config(preset)):
            if w.fmt == FP8:
                assert all(d <= 128 or d % 128 == 0 for d in w.shape), (preset, w)
                if preset == "vllm-shaped":
                    assert all(d % 128 == 0 for d in w.shape), w


def test_vllm_shaped_keeps_the_attention_shapes_vllm_needs():
    c = tiny_config("vllm-shaped")
    assert (c["head_dim"], c["qk_rope_head_dim"]) == (512, 64)
    assert (c["hidden_size"], c["num_attention_heads"], c["n_routed_experts"], c["num_hidden_layers"]) == (
        512,
        8,
        8,
        2,
    )
    assert (c["index_n_heads"], c["index_head_dim"]) == (64, 128)  # the release's indexer


def test_values_are_sane(built):
    """Valid hash tables, norms near 1, finite everything, FP8/MXFP4 that dequantize to weights of
    std ~ 1/sqrt(fan_in)."""
    preset, path = built
    config = tiny_config(preset)
    t = _read(path)
    for w in release_weights(config):
        if w.fmt == FP8 or w.fmt == MXFP4:
            q, s = t[f"{w.name}.weight"], t[f"{w.name}.scale"]
            assert not torch.isnan(ue8m0_decode(s)).any(), w.name
            deq = fp8_block_dequantize(q, s, dtype=torch.float32) if w.fmt == FP8 else mxfp4_dequantize(q, s)
            std = float(deq.float().std()) * w.shape[1] ** 0.5
            assert 0.7 < std < 1.3, (w.name, std)
            continue
        x = t[w.name]
        if w.name.endswith("tid2eid"):
            assert int(x.min()) >= 0 and int(x.max()) < config["n_routed_experts"]
            assert all(len(set(row)) == len(row) for row in x.tolist())  # distinct experts per token
            continue
        assert torch.isfinite(x).all(), w.name
        if w.name.endswith("norm.weight"):
            assert float((x.float() - 1).abs().max()) < 0.5, w.name


def test_same_seed_is_byte_identical_and_another_seed_is_not(tmp_path):
    def files(path: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(path.iterdir())}

    # micro only: the presets differ in their config, not in the code that draws and writes the tensors
    # (building vllm-shaped twice took most of this test's second)
    a = files(build_tiny_release(tmp_path / "micro-a", "micro", seed=0))
    b = files(build_tiny_release(tmp_path / "micro-b", "micro", seed=0))
    assert a == b
    c = files(build_tiny_release(tmp_path / "micro-c", "micro", seed=1))
    assert c.keys() == a.keys() and c["config.json"] == a["config.json"]
    assert all(c[n] != a[n] for n in a if n.endswith(".safetensors"))


def test_unknown_preset_is_refused():
    with pytest.raises(ValueError, match=r"unknown tiny preset 'nano'.*micro, vllm-shaped"):
        tiny_config("nano")
