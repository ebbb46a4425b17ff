"""transformers 5.23 as an independent reader of our release-layout checkpoints (BRIEF §6), on the
micro tiny model: both the release-quantized and the BF16 directory load with no missing or
unexpected key, transformers' own FP8/MXFP4 dequantization gives bit-identical weights to ours, and
the two loads give bit-identical logits."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from harness.reference import (
    BF16,
    RELEASE_QUANTIZED,
    ReferenceLoadError,
    compare,
    load_reference,
    logits,
    reference_batch,
)
from harness.tiny import tiny_config, write_checkpoint_dir
from pipeline.release_layout import FP8, MXFP4, PLAIN, release_weights
from tests.helpers import dequantize_tensor, read_tensors

pytestmark = [pytest.mark.tiny, pytest.mark.quant]

MICRO = tiny_config("micro")

# Dialect N -> dialect H (BRIEF §3), written out independently of transformers' conversion mapping.
_TOP = {
    "embed.weight": "model.embed_tokens.weight",
    "head.weight": "lm_head.weight",
    "norm.weight": "model.norm.weight",
    "hc_head_fn": "model.hc_head.hc_fn",
    "hc_head_base": "model.hc_head.hc_base",
    "hc_head_scale": "model.hc_head.hc_scale",
}
_LAYER = {
    "attn.attn_sink": "self_attn.sinks",
    "attn.q_norm.weight": "self_attn.q_a_norm.weight",
    "attn.kv_norm.weight": "self_attn.kv_norm.weight",
    "attn.wq_a": "self_attn.q_a_proj.weight",
    "attn.wq_b": "self_attn.q_b_proj.weight",
    "attn.wkv": "self_attn.kv_proj.weight",
    "attn.wo_a": "self_attn.o_a_proj.weight",
    "attn.wo_b": "self_attn.o_b_proj.weight",
    "attn.compressor.ape": "self_attn.compressor.position_bias",
    "attn.compressor.norm.weight": "self_attn.compressor.kv_norm.weight",
    "attn.compressor.wkv.weight": "self_attn.compressor.kv_proj.weight",
    "attn.compressor.wgate.weight": "self_attn.compressor.gate_proj.weight",
    "attn.indexer.compressor.ape": "self_attn.compressor.indexer.position_bias",
    "attn.indexer.compressor.norm.weight": "self_attn.compressor.indexer.kv_norm.weight",
    "attn.indexer.compressor.wkv.weight": "self_attn.compressor.indexer.kv_proj.weight",
    "attn.indexer.compressor.wgate.weight": "self_attn.compressor.indexer.gate_proj.weight",
    "attn.indexer.weights_proj.weight": "self_attn.compressor.indexer.scorer.weights_proj.weight",
    "attn.indexer.wq_b": "self_attn.compressor.indexer.q_b_proj.weight",
    "ffn.gate.weight": "mlp.gate.weight",
    "ffn.gate.bias": "mlp.gate.e_score_correction_bias",
    "ffn.gate.tid2eid": "mlp.gate.tid2eid",
    "ffn.shared_experts.w1": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared_experts.w2": "mlp.shared_experts.down_proj.weight",
    "ffn.shared_experts.w3": "mlp.shared_experts.up_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    **{f"hc_{site}_{p}": f"{site}_hc.{p}" for site in ("attn", "ffn") for p in ("fn", "base", "scale")},
}
_EXPERT = re.compile(r"^ffn\.experts\.(\d+)\.(w[123])$")


def expected_state_dict(release: Path, config: dict) -> dict[str, torch.Tensor]:
    """What transformers' float32 state dict must hold, from our own reading of the release: every
    quantized weight dequantized with pipeline.formats, experts fused as [w1; w3] (gate first) and
    stacked, plain tensors upcast; mtp.* left out (transformers does not build the MTP block)."""
    tensors = read_tensors(release)
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for w in release_weights(config):
        if w.name.startswith("mtp."):
            continue
        if w.fmt in (FP8, MXFP4):
            value = dequantize_tensor(tensors[f"{w.name}.weight"], tensors[f"{w.name}.scale"], torch.float32)
        else:
            assert w.fmt == PLAIN
            value = tensors[w.name]
            value = value.float() if value.is_floating_point() else value
        if w.name in _TOP:
            out[_TOP[w.name]] = value
            continue
        _, layer, rest = w.name.split(".", 2)
        expert = _EXPERT.match(rest)
        if expert:
            experts.setdefault((layer, expert[2]), {})[int(expert[1])] = value
            continue
        out[f"model.layers.{layer}.{_LAYER[rest]}"] = value  # KeyError: a weight this table misses
    for (layer, proj), by_expert in experts.items():
        experts[(layer, proj)] = torch.stack([by_expert[e] for e in range(len(by_expert))])
    for layer in sorted({layer for layer, _ in experts}):
        gate_up = torch.cat([experts[(layer, "w1")], experts[(layer, "w3")]], dim=1)
        out[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = gate_up
        out[f"model.layers.{layer}.mlp.experts.down_proj"] = experts[(layer, "w2")]
    return out


def _mtp_keys(path: Path) -> list[str]:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    return sorted(k for k in index["weight_map"] if k.startswith("mtp."))


# ---- (a) the release checkpoint, quantized path ------------------------------------------------


def test_release_checkpoint_loads_with_no_missing_or_unexpected_key(micro_release, micro_quantized_model):
    model, report = micro_quantized_model
    assert report.kind == RELEASE_QUANTIZED
    assert report.missing_keys == [] and report.unexpected_keys == []
    assert report.mismatched_keys == [] and report.error_msgs == []
    # mtp.* (weights and scales) are dropped by transformers' _keys_to_ignore_on_load_unexpected, silently
    assert report.ignored_keys == _mtp_keys(micro_release) != []
    assert report.config_edits == []
    assert not any(n.startswith("mtp") or ".mtp." in n for n in model.state_dict())


def test_release_load_leaves_unquantized_weights_in_bf16_and_the_loader_upcasts_them(
    micro_release, micro_quantized_model
):
    """transformers 5.23 bug the loader works around: with the FP8 quantizer in dequantize mode,
    plain BF16 ``.weight`` tensors skip the cast to the requested float32. Exactly those are upcast."""
    model, report = micro_quantized_model
    stored = read_tensors(micro_release)
    plain_bf16_weights = {
        hf
        for native, hf in _native_to_hf_plain(MICRO).items()
        if native.endswith(".weight") and stored[native].dtype == torch.bfloat16
    }
    assert set(report.upcast) == plain_bf16_weights != set()
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= plain_bf16_weights
    assert all(p.dtype == torch.float32 for p in model.parameters())


def _native_to_hf_plain(config: dict) -> dict[str, str]:
    out = {}
    for w in release_weights(config):
        if w.fmt != PLAIN or w.name.startswith("mtp."):
            continue
        if w.name in _TOP:
            out[w.name] = _TOP[w.name]
        else:
            _, layer, rest = w.name.split(".", 2)
            out[w.name] = f"model.layers.{layer}.{_LAYER[rest]}"
    return out


def test_release_checkpoint_gives_finite_sane_logits(micro_quantized_model):
    model, _ = micro_quantized_model
    out = logits(model, reference_batch(MICRO["vocab_size"], seed=0))
    assert out.shape == (4, 32, MICRO["vocab_size"])
    assert torch.isfinite(out).all()
    assert 0.1 < float(out.std()) < 10  # init scales keep the forward O(1)


def test_transformers_dequantizes_every_weight_bit_identically_to_ours(micro_release, micro_quantized_model):
    """Every parameter and buffer of the loaded model equals our own reading of the checkpoint: FP8
    tiles and MXFP4 experts dequantized by pipeline.formats, experts fused gate first, norms, hash
    tables and F32 tensors as stored. The key sets are equal: nothing is left at its init value."""
    model, _ = micro_quantized_model
    expected = expected_state_dict(micro_release, MICRO)
    actual = model.state_dict()
    assert actual.keys() == expected.keys()
    differ = [
        k for k in expected if actual[k].dtype != expected[k].dtype or not torch.equal(actual[k], expected[k])
    ]
    assert differ == []


# ---- (b) the BF16 dequantization, native names ---------------------------------------------------


def test_bf16_checkpoint_loads_with_no_missing_or_unexpected_key(micro_bf16, micro_bf16_model):
    _, report = micro_bf16_model
    assert report.kind == BF16
    assert report.missing_keys == [] and report.unexpected_keys == []
    assert report.mismatched_keys == [] and report.error_msgs == []
    assert report.ignored_keys == _mtp_keys(micro_bf16) != []
    # dsv4 dequant already wrote config.json without quantization_config: nothing to edit
    assert report.config_edits == []
    assert "quantization_config" not in json.loads((micro_bf16 / "config.json").read_text())
    assert report.upcast == []  # the plain path casts BF16 to float32 itself


def test_bf16_dir_with_the_release_quantization_config_loads_mixed_precision(
    micro_release, micro_bf16, micro_bf16_model, tmp_path
):
    """Why `dsv4 dequant` drops quantization_config (and the loader does for other BF16 dirs): with the
    release's config, transformers 5.23 sets up the FP8 quantizer (switching itself to dequantize on a
    CPU), keeps every BF16 ``.weight`` in BF16 inside a float32 model, and runs a silently
    mixed-precision forward."""
    import shutil

    from transformers import DeepseekV4ForCausalLM

    with_release_config = tmp_path / "bf16-with-release-config"
    shutil.copytree(micro_bf16, with_release_config)
    shutil.copy(micro_release / "config.json", with_release_config / "config.json")
    model, info = DeepseekV4ForCausalLM.from_pretrained(
        with_release_config, dtype=torch.float32, output_loading_info=True
    )
    model.eval()
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16, torch.float32}
    tokens = reference_batch(MICRO["vocab_size"], seed=0)
    assert not torch.equal(logits(model, tokens), logits(micro_bf16_model[0], tokens))


def test_bf16_and_quantized_loads_have_identical_state_dicts(micro_quantized_model, micro_bf16_model):
    a, b = micro_quantized_model[0].state_dict(), micro_bf16_model[0].state_dict()
    assert a.keys() == b.keys()
    differ = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert differ == []


@pytest.mark.parametrize(
    "batch,seq",
    [(4, 32), (2, 160)],
    ids=["4x32", "2x160-hca-windows"],  # 160 > 128: the HCA layer emits a compressed entry
)
def test_bf16_and_quantized_loads_give_equal_logits(micro_quantized_model, micro_bf16_model, batch, seq):
    tokens = reference_batch(MICRO["vocab_size"], seed=seq, batch=batch, seq=seq)
    a = logits(micro_quantized_model[0], tokens)
    b = logits(micro_bf16_model[0], tokens)
    assert torch.equal(a, b)
    assert compare(a, b) == {"kl": 0.0, "top1": 1.0}


# ---- (c) the in-memory state-dict path -----------------------------------------------------------


def test_state_dict_path_matches_directory_path(micro_bf16, micro_bf16_model):
    """from_pretrained(None, state_dict=...) runs the same conversion mapping on in-memory tensors
    instead of safetensors slices; it must build the same model."""
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    raw = json.loads((micro_bf16 / "config.json").read_text())
    model, info = DeepseekV4ForCausalLM.from_pretrained(
        None,
        config=DeepseekV4Config.from_dict(raw),
        state_dict=read_tensors(micro_bf16),
        dtype=torch.float32,
        output_loading_info=True,
    )
    model.eval()
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
    tokens = reference_batch(MICRO["vocab_size"], seed=3)
    assert torch.equal(logits(model, tokens), logits(micro_bf16_model[0], tokens))


# ---- the loader's checks have teeth ----------------------------------------------------------------


def _variant(src: Path, dst: Path, edit) -> Path:
    tensors = read_tensors(src)
    edit(tensors)
    return write_checkpoint_dir(dst, json.loads((src / "config.json").read_text()), tensors)


def test_missing_fp8_scale_loads_silently_in_transformers_and_the_loader_refuses_it(micro_release, tmp_path):
    from transformers import DeepseekV4ForCausalLM, FineGrainedFP8Config

    path = _variant(micro_release, tmp_path / "no-scale", lambda t: t.pop("layers.0.attn.wq_a.scale"))
    model, info = DeepseekV4ForCausalLM.from_pretrained(
        path,
        quantization_config=FineGrainedFP8Config(dequantize=True, scale_fmt="ue8m0"),
        dtype=torch.float32,
        output_loading_info=True,
    )
    # transformers 5.23 says nothing: no missing key, and the weight is the raw unscaled e4m3 values
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
    raw = read_tensors(path)["layers.0.attn.wq_a.weight"]
    assert torch.equal(model.model.layers[0].self_attn.q_a_proj.weight.float(), raw.float())
    with pytest.raises(ReferenceLoadError, match=r"without a \.scale sibling"):
        load_reference(path)


@pytest.mark.parametrize(
    "edit,field",
    [
        (lambda t: t.pop("layers.2.attn_norm.weight"), "missing"),
        (lambda t: t.__setitem__("layers.0.attn.bogus.weight", torch.zeros(3)), "unexpected"),
    ],
    ids=["missing-norm", "unexpected-key"],
)
def test_loader_is_strict_about_keys(micro_release, tmp_path, edit, field):
    path = _variant(micro_release, tmp_path / field, edit)
    with pytest.raises(ReferenceLoadError, match=field):
        load_reference(path)
    _, report = load_reference(path, strict=False)
    assert not report.clean


def test_vllm_shaped_release_loads_and_runs(tmp_path):
    from harness.tiny import build_tiny_release

    config = tiny_config("vllm-shaped")
    model, report = load_reference(build_tiny_release(tmp_path / "v", "vllm-shaped"))
    assert report.clean and report.ignored_keys
    out = logits(model, reference_batch(config["vocab_size"], seed=0, batch=2, seq=32))
    assert torch.isfinite(out).all()


# ---- helpers (no transformers needed) --------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_reference_batch_is_fixed(seed):
    a, b = reference_batch(100, seed), reference_batch(100, seed)
    assert torch.equal(a, b) and a.shape == (4, 32) and a.dtype == torch.int64
    assert int(a.min()) >= 0 and int(a.max()) < 100
    assert not torch.equal(a, reference_batch(100, seed + 1))


def test_compare_kl_and_top1():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 5, 11, generator=g)
    assert compare(a, a) == {"kl": 0.0, "top1": 1.0}
    assert compare(a, a + 3.0) == {"kl": pytest.approx(0.0, abs=1e-12), "top1": 1.0}  # shift-invariant
    b = a.clone()
    b[0, 0] = -b[0, 0]  # one of 10 positions flips its ranking
    got = compare(a, b)
    assert got["top1"] == pytest.approx(0.9) and got["kl"] > 0
    la, lb = a[0, 0].double().log_softmax(-1), b[0, 0].double().log_softmax(-1)
    assert got["kl"] == pytest.approx(float((la.exp() * (la - lb)).sum()) / 10, rel=1e-12)
