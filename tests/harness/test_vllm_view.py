"""harness.vllm_view: vLLM's effective weights of a converted checkpoint, and its key-set checks.

One converted micro checkpoint is built once (harness.vllm_view.synthetic_converted: the release's
experts transcoded to NVFP4 with w1/w3 sharing one weight_scale_2) and one expert is rewritten here
with pipeline.formats.nvfp4_quantize so that w3's weight_scale_2 differs from w1's. Expected values
are computed independently of the view's code: NVFP4 from unpacked nibbles and the E2M1 table, FP8
tile by tile from the UE8M0 bytes. The vLLM code these semantics copy is exercised by
tests/harness/test_vllm_view_semantics.py.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open

from harness.tiny import write_checkpoint_dir
from harness.vllm_view import (
    KeyMismatchError,
    MissingKeyError,
    ScaleMismatch,
    UnexpectedKeyError,
    VllmLoadError,
    effective_weights,
    micro_converted_config,
    mismatch_w13,
    synthetic_converted,
    write_effective_checkpoint,
)
from pipeline.formats import e2m1_decode, nvfp4_global_scale, unpack_nibbles
from pipeline.mapping import target_layout
from pipeline.release_layout import FP8

pytestmark = pytest.mark.unit

CRAFTED = "layers.1.ffn.experts.2"  # w3's weight_scale_2 differs from w1's here
A13 = 9.0 / 2688  # the crafted w3 input_scale: above every synthetic one (at most 5 / 2688)


def _config() -> dict:
    return micro_converted_config()


@pytest.fixture(scope="module")
def tensors() -> dict[str, torch.Tensor]:
    config = _config()
    out = synthetic_converted(config, seed=0)
    mismatch_w13(out, config, CRAFTED, seed=7)  # w3's weight_scale_2 ~8x w1's
    out[f"{CRAFTED}.w1.input_scale"] = nvfp4_global_scale(2.0)
    out[f"{CRAFTED}.w3.input_scale"] = torch.tensor(A13, dtype=torch.float32)
    return out


def _write(path, tensors, config=None):
    return write_checkpoint_dir(path, config or _config(), tensors)


@pytest.fixture(scope="module")
def view(tensors, tmp_path_factory):
    return effective_weights(_write(tmp_path_factory.mktemp("converted"), tensors))


def _nvfp4(packed: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """E2M1 value x e4m3 block scale x global scale, element by element (not the view's code path)."""
    values = e2m1_decode(unpack_nibbles(packed))
    return values * (block_scale.float() * global_scale.float()).repeat_interleave(16, dim=-1)


def _expert(tensors, module: str, proj: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    k = f"{module}.{proj}"
    return tensors[f"{k}.weight"], tensors[f"{k}.weight_scale"], tensors[f"{k}.weight_scale_2"]


def test_w3_is_scaled_by_w1s_weight_scale_2(tensors, view):
    codes1, bs1, g1 = _expert(tensors, CRAFTED, "w1")
    codes3, bs3, g3 = _expert(tensors, CRAFTED, "w3")
    assert float(g3) > 4 * float(g1)  # the case this test is about
    got = view.weights[f"{CRAFTED}.w3.weight"]
    assert got.dtype == torch.float32
    assert torch.equal(got, _nvfp4(codes3, bs3, g1))
    correct = _nvfp4(codes3, bs3, g3)
    assert not torch.allclose(got, correct, rtol=0.5, atol=0)  # vLLM's w3 is not the real w3 ...
    assert torch.allclose(got * (g3 / g1), correct, rtol=1e-6, atol=0)  # ... it is off by g1/g3
    assert torch.equal(view.weights[f"{CRAFTED}.w1.weight"], _nvfp4(codes1, bs1, g1))


def test_w2_and_unmodified_experts_use_their_own_global_scale(tensors, view):
    codes2, bs2, g2 = _expert(tensors, CRAFTED, "w2")
    g1 = tensors[f"{CRAFTED}.w1.weight_scale_2"]
    assert float(g2) != float(g1)
    assert torch.equal(view.weights[f"{CRAFTED}.w2.weight"], _nvfp4(codes2, bs2, g2))
    other = "layers.3.ffn.experts.1"
    for proj in ("w1", "w2", "w3"):
        assert torch.equal(view.weights[f"{other}.{proj}.weight"], _nvfp4(*_expert(tensors, other, proj)))


def test_only_the_crafted_expert_is_a_w13_scale_mismatch(tensors, view):
    g1 = float(tensors[f"{CRAFTED}.w1.weight_scale_2"])
    g3 = float(tensors[f"{CRAFTED}.w3.weight_scale_2"])
    assert view.w13_scale_mismatches == [ScaleMismatch(f"{CRAFTED}.w13", g1, g3, warns=True)]
    assert view.w13_scale_mismatches[0].factor == pytest.approx(g1 / g3)


def test_input_scales_take_the_max_of_w1_and_w3_per_expert_and_over_the_layer(tensors, view):
    assert view.input_scales[f"{CRAFTED}.w13"] == float(torch.tensor(A13, dtype=torch.float32))
    experts = sorted({k.rsplit(".", 2)[0] for k in tensors if ".ffn.experts." in k})
    assert {k.rsplit(".", 1)[0] for k in view.input_scales} == set(experts)
    for module in experts:
        s = {p: float(tensors[f"{module}.{p}.input_scale"]) for p in ("w1", "w2", "w3")}
        assert view.input_scales[f"{module}.w13"] == max(s["w1"], s["w3"])
        assert view.input_scales[f"{module}.w2"] == s["w2"]
    for block in sorted({m.rsplit(".", 1)[0] for m in experts}):  # "<block>.ffn.experts"
        mine = [m for m in experts if m.rsplit(".", 1)[0] == block]
        for proj, parts in (("w13", ("w1", "w3")), ("w2", ("w2",))):
            want = max(float(tensors[f"{m}.{p}.input_scale"]) for m in mine for p in parts)
            assert view.global_input_scales[f"{block}.{proj}"] == want
    assert view.global_input_scales["layers.1.ffn.experts.w13"] == view.input_scales[f"{CRAFTED}.w13"]


def test_fp8_weights_are_dequantized_tile_by_tile(tensors, view):
    layout = target_layout(_config())
    fp8 = [t.weight for t in layout.values() if t.fmt == FP8 and t.key.endswith(".weight")]
    assert fp8
    multi = [w for w in fp8 if min(tensors[f"{w}.scale"].shape) >= 2]
    assert multi  # a 2x2 tile grid at least, so a transposed or shifted grid shows
    for w in fp8:
        q, scale = tensors[f"{w}.weight"], tensors[f"{w}.scale"].view(torch.uint8)
        want = torch.empty(q.shape)
        for i in range(scale.shape[0]):
            for j in range(scale.shape[1]):
                tile = (slice(128 * i, 128 * (i + 1)), slice(128 * j, 128 * (j + 1)))
                want[tile] = q[tile].float() * 2.0 ** (int(scale[i, j]) - 127)
        got = view.weights[f"{w}.weight"]
        assert got.dtype == torch.float32 and torch.equal(got, want), w
        assert f"{w}.scale" not in view.weights
    assert any(not torch.equal(view.weights[f"{w}.weight"], tensors[f"{w}.weight"].float()) for w in multi)


def test_plain_tensors_are_kept_as_float32(tensors, view):
    for key in ("embed.weight", "layers.0.attn.attn_sink", "layers.2.ffn.gate.bias", "hc_head_fn"):
        assert view.weights[key].dtype == torch.float32
        assert torch.equal(view.weights[key], tensors[key].float())
    tid2eid = view.weights["layers.0.ffn.gate.tid2eid"]  # integer: kept as stored
    assert tid2eid.dtype == torch.int64 and torch.equal(tid2eid, tensors["layers.0.ffn.gate.tid2eid"])


def test_unknown_key_is_an_error_naming_it(tensors, tmp_path):
    bad = dict(tensors, **{"layers.0.attn.wq_c.weight": torch.zeros(2, dtype=torch.bfloat16)})
    with pytest.raises(UnexpectedKeyError, match=r"layers\.0\.attn\.wq_c\.weight"):
        effective_weights(_write(tmp_path, bad))


def test_missing_key_is_an_error_naming_it(tensors, tmp_path):
    key = "layers.2.ffn.experts.1.w3.weight_scale_2"  # vLLM would not notice a missing expert tensor
    with pytest.raises(MissingKeyError, match=re.escape(key)):
        effective_weights(_write(tmp_path, {k: t for k, t in tensors.items() if k != key}))


def test_wrong_shape_is_an_error_naming_the_key(tensors, tmp_path):
    key = "layers.1.attn.wq_a.scale"
    bad = dict(tensors, **{key: tensors[key][:, :1].contiguous()})
    with pytest.raises(KeyMismatchError, match=re.escape(key)):
        effective_weights(_write(tmp_path, bad))


def test_absent_mtp_is_tolerated_but_a_partial_one_is_not(tensors, view, tmp_path):
    no_mtp = {k: t for k, t in tensors.items() if not k.startswith("mtp.")}
    assert len(no_mtp) < len(tensors)
    v = effective_weights(_write(tmp_path / "no-mtp", no_mtp))
    assert v.mtp_absent and not view.mtp_absent
    assert set(v.weights) == {k for k in view.weights if not k.startswith("mtp.")}
    assert not any(k.startswith("mtp.") for k in (*v.input_scales, *v.global_input_scales))
    assert torch.equal(v.weights[f"{CRAFTED}.w3.weight"], view.weights[f"{CRAFTED}.w3.weight"])
    partial = {k: t for k, t in tensors.items() if k != "mtp.0.e_proj.scale"}
    with pytest.raises(MissingKeyError, match=r"mtp\.0\.e_proj\.scale"):
        effective_weights(_write(tmp_path / "partial", partial))


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda c: c["quantization_config"].pop("moe_quant_algo"), "moe_quant_algo"),
        (lambda c: c["quantization_config"].update(quant_method="modelopt"), "quant_method"),
        (lambda c: c.update(expert_dtype="fp8"), "expert_dtype"),
        (lambda c: c.pop("compress_ratios"), "compress_ratios"),
    ],
    ids=["no-moe_quant_algo", "modelopt", "fp8-experts", "no-compress_ratios"],
)
def test_config_vllm_would_not_read_as_nvfp4_experts_is_refused(tensors, tmp_path, edit, match):
    config = _config()
    edit(config)
    with pytest.raises(VllmLoadError, match=match):
        effective_weights(_write(tmp_path, tensors, config))


def test_effective_checkpoint_is_float32_native_names_without_quantization_config(view, tmp_path):
    out = write_effective_checkpoint(view, tmp_path / "effective")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["torch_dtype"] == "float32"
    assert config["compress_ratios"] == view.config["compress_ratios"]
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert keys == set(view.weights)
        assert not any(
            k.endswith((".scale", ".weight_scale", ".weight_scale_2", ".input_scale")) for k in keys
        )
        w3 = f"{CRAFTED}.w3.weight"
        assert torch.equal(f.get_tensor(w3), view.weights[w3])
        dtypes = {f.get_slice(k).get_dtype() for k in keys}
    assert dtypes == {"F32", "I64"}
