"""`dsv4 quantize` on the micro model through real ModelOpt 0.47 on a CPU: both recipes, the export's
layout, the runtime patches (targets present, same signature, actually reached), NVIDIA's fallback,
recovery modes, and each recipe's distance from the BF16 model.

Runs the seeds' quantization failures would have been caught by: Run 1 (FP8 source), Runs 2 and 10
(export reading GPU tensors: the export-on-cpu patch must be reached by every weight export), the
ModelOpt 0.46 move of `_export_fused_experts` (a patch on a moved target is reported as unreached),
and the activation-scale assert. Runs 3–9 concern hf_ptq on the node: tests/quantize/test_hf_ptq_driver.py.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from harness.quantized import dequantized_export
from harness.reference import compare, load_reference, logits, reference_batch
from patches import modelopt_patches
from pipeline.checkpoint import Checkpoint
from pipeline.cli import main as dsv4
from pipeline.quantize import (
    REPORT_NAME,
    QuantizeOptions,
    apply_fallbacks,
    load_bf16_model,
    quantize_checkpoint,
    quantizers,
    state_dir_for,
)

pytestmark = [pytest.mark.tiny, pytest.mark.quant]

NVFP4 = ("U8", "F8_E4M3", "F32")  # weight, weight_scale, weight_scale_2 dtypes


@pytest.fixture
def exports(modelopt_exports) -> dict[str, Path]:
    return modelopt_exports


def _nvfp4_weights(export: Path) -> dict[str, tuple]:
    ck = Checkpoint.open(export)
    return {
        k: (i.dtype, ck.tensors[k[:-7] + ".weight_scale"].dtype, ck.tensors[k[:-7] + ".weight_scale_2"].dtype)
        for k, i in ck.tensors.items()
        if k.endswith(".weight") and i.dtype == "U8"
    }


def test_experts_recipe_quantizes_exactly_the_routed_experts(exports):
    quantized = _nvfp4_weights(exports["experts"])
    assert quantized and all(v == NVFP4 for v in quantized.values())
    assert all(".ffn.experts." in k for k in quantized)
    ck = Checkpoint.open(exports["experts"])
    assert ck.tensors["model.layers.0.attn.wq_a.weight"].dtype == "BF16"  # attention as released (in BF16)
    layers = {int(k.split(".")[2]) for k in quantized}
    experts = {int(k.split(".")[5]) for k in quantized}
    assert layers == {0, 1, 2, 3} and experts == {0, 1, 2, 3}
    assert len(quantized) == 4 * 4 * 3  # layers x experts x (w1, w2, w3)


def test_full_recipe_quantizes_every_linear_but_wo_a_and_the_router(exports):
    quantized = _nvfp4_weights(exports["full"])
    assert any(".attn.wq_a." in k for k in quantized) and any(".shared_experts." in k for k in quantized)
    assert any(".compressor." in k for k in quantized)  # ModelOpt quantizes every nn.Linear (BRIEF §3)
    ck = Checkpoint.open(exports["full"])
    assert ck.tensors["model.layers.0.attn.wo_a.weight"].dtype == "BF16"  # grouped linear, left alone
    assert not any(".gate." in k and ".experts." not in k for k in quantized)


def test_export_is_dialect_x(exports):
    keys = set(Checkpoint.open(exports["experts"]).tensors)
    assert "model.embed_tokens.weight" in keys and "head.weight" in keys
    assert "model.layers.0.attn.norm.weight" in keys  # transformers 5.23's reversal renames kv_norm
    assert not any(k.startswith("mtp.") for k in keys)  # transformers does not build the MTP block


def test_w1_and_w3_share_their_global_scale(exports):
    """vLLM keeps w1's weight_scale_2 for the fused w13: ModelOpt's fused gate_up quantizer gives both the
    same amax, so nothing is lost (the converter re-checks this for split-expert exports)."""
    ck = Checkpoint.open(exports["experts"])
    pairs = 0
    for key in ck.tensors:
        if key.endswith(".w1.weight_scale_2"):
            assert torch.equal(ck.read(key), ck.read(key.replace(".w1.", ".w3."))), key
            pairs += 1
    assert pairs == 16


def test_report_records_patches_reached_and_versions(exports):
    for recipe, path in exports.items():
        report = json.loads((path / REPORT_NAME).read_text())
        assert report["recipe"] == recipe
        quantized_weights = len(_nvfp4_weights(path))
        calls = {p["name"]: p["calls"] for p in report["patches"]}
        assert calls["export-on-cpu"] == quantized_weights  # every weight export went through it
        assert calls["activation-scale-clamp"] >= 1
        assert report["versions"]["nvidia-modelopt"] == "0.47.0"
        assert report["uncalibrated"] == []  # 0.47 fused experts: weight amax from weights, shared input
        assert (state_dir_for(path) / "amax.safetensors").is_file()


def test_experts_recipe_is_closer_to_bf16_than_full(exports, micro_bf16, tmp_path, record_property):
    base, _ = load_reference(micro_bf16)
    tokens = reference_batch(base.config.vocab_size, seed=0, batch=4, seq=64)
    ref = logits(base, tokens)
    scores = {}
    for recipe, path in exports.items():
        model, report = load_reference(dequantized_export(path, tmp_path / recipe, micro_bf16))
        assert report.missing_keys == [] and report.unexpected_keys == []
        scores[recipe] = compare(logits(model, tokens), ref)
        record_property(f"{recipe}_kl", scores[recipe]["kl"])
        record_property(f"{recipe}_top1", scores[recipe]["top1"])
    print(f"\nmicro, 4x64 tokens, weights dequantized from the export: {scores}")
    assert 0 < scores["experts"]["kl"] <= scores["full"]["kl"]
    assert scores["experts"]["top1"] >= scores["full"]["top1"]


def test_experts_recipe_leaves_every_other_parameter_bit_identical(exports, micro_bf16, tmp_path):
    """Includes the attention kv_norm that the export calls attn.norm: it must land on kv_norm again."""
    base, _ = load_reference(micro_bf16)
    model, _ = load_reference(dequantized_export(exports["experts"], tmp_path / "e", micro_bf16))
    a, b = base.state_dict(), model.state_dict()
    changed = sorted(k for k in a if not torch.equal(a[k], b[k]))
    assert changed == sorted(k for k in a if ".mlp.experts." in k)


# ---- Run 1 -----------------------------------------------------------------------------------------


def test_run1_release_fp8_source_is_refused_before_loading(micro_release, tmp_path, capsys):
    assert dsv4(["quantize", str(micro_release), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "dsv4 quantize needs a BF16" in err and "dequantize the release checkpoint to BF16 first" in err
    assert not (tmp_path / "out").exists()


# ---- the patches: present, same signature, reached --------------------------------------------------


def test_every_patch_target_matches_the_installed_modelopt(snapshot):
    modelopt_patches.check_targets()
    table = [
        {
            "name": p.name,
            "module": p.target.module,
            "qualname": p.target.qualname,
            "signature": p.target.signature,
        }
        for p in modelopt_patches.PATCHES
    ]
    assert table == snapshot


def test_a_changed_signature_is_refused():
    patch = modelopt_patches.PATCHES[0]
    moved = modelopt_patches.Patch(
        "old-signature",
        modelopt_patches.Target(patch.target.module, patch.target.qualname, "(sub_module, dtype)"),
        prevents="test",
        wrap=lambda f: f,
    )
    with pytest.raises(modelopt_patches.PatchTargetError, match="has signature"):
        modelopt_patches.check_targets((moved,))


@pytest.fixture(scope="module")
def calibrated(micro_bf16):
    """A calibrated full-recipe model in memory, for tests that export it themselves."""
    import modelopt.torch.quantization as mtq

    from pipeline.recipes import recipe_config

    model = load_bf16_model(micro_bf16, torch.device("cpu"))
    tokens = reference_batch(model.config.vocab_size, seed=1)
    mtq.quantize(model, recipe_config("full"), lambda m: m(input_ids=tokens))
    return model


def test_seeds_patch_on_the_moved_export_fused_experts_is_never_reached(calibrated, tmp_path):
    """The seeds patched `_export_fused_experts` in its old home; from ModelOpt 0.46 the export calls the
    copy hf_export_handlers imported, so that patch silently did nothing. Here the same patch, declared
    on `moe_utils._export_fused_experts`, is reported unreached while ours are reached."""
    from modelopt.torch.export import export_hf_checkpoint

    seeds_style = modelopt_patches.Patch(
        "seeds-fused-experts",
        modelopt_patches.Target(
            "modelopt.torch.export.moe_utils",
            "_export_fused_experts",
            "(module: torch.nn.modules.module.Module, dtype: torch.dtype) -> None",
        ),
        prevents="Run 10 as the seeds fixed it",
        wrap=lambda original: original,
    )
    model = _copy(calibrated)
    with modelopt_patches.applied((*modelopt_patches.PATCHES, seeds_style)) as applied:
        export_hf_checkpoint(model, export_dir=tmp_path / "export")
    assert modelopt_patches.unreached(applied) == ["seeds-fused-experts"]


def _copy(model):
    import copy

    return copy.deepcopy(model)


def test_modelopt_047_substitutes_maxbound_for_a_zero_input_amax(calibrated, tmp_path):
    """Pins 0.47's own guard: export_amax() replaces a zero amax by maxbound (with a warning) before the
    assert in get_activation_scaling_factor. If a version drops it, this fails and the clamp patch
    below is what stands between a zero amax and a lost export."""
    from modelopt.torch.export import export_hf_checkpoint

    model = _copy(calibrated)
    found = quantizers(model)
    # o_b_proj: its input feeds no other module (ModelOpt unifies the amax of modules sharing an input,
    # e.g. q_a_proj and kv_proj, which would hide the zero)
    name = "model.layers.3.self_attn.o_b_proj.input_quantizer"
    found[name].amax = torch.zeros(())
    modelopt_patches.CLAMPED_ACTIVATION_SCALES.clear()
    with warnings.catch_warnings(record=True) as caught, modelopt_patches.applied():
        warnings.simplefilter("always")
        export_hf_checkpoint(model, export_dir=tmp_path / "export")
    assert any("Substituting maxbound" in str(w.message) for w in caught), [
        str(w.message)[:80] for w in caught
    ]
    scale = Checkpoint.open(tmp_path / "export").read("model.layers.3.attn.wo_b.input_scale")
    assert float(scale) == pytest.approx(1 / 448.0)  # maxbound / (maxbound * 448)
    assert modelopt_patches.CLAMPED_ACTIVATION_SCALES == []  # ModelOpt's guard ran first


class _Quantizer045:
    """An input quantizer as ModelOpt 0.45 exported it: export_amax() returns the raw zero."""

    is_enabled = True
    maxbound = 6.0
    _dsv4_name = "model.layers.7.mlp.experts.83.gate_proj.input_quantizer"

    def export_amax(self):
        return torch.zeros(())


def test_clamp_patch_turns_the_045_assert_into_a_reported_clamp():
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    quantizer = _Quantizer045()
    with pytest.raises(AssertionError, match="not positive"):  # what lost the export
        NVFP4QTensor.get_activation_scaling_factor(quantizer)
    modelopt_patches.CLAMPED_ACTIVATION_SCALES.clear()
    with pytest.warns(UserWarning, match="clamped"), modelopt_patches.applied():
        scale = NVFP4QTensor.get_activation_scaling_factor(quantizer)
    assert float(scale) == torch.finfo(torch.float32).tiny
    clamped = modelopt_patches.CLAMPED_ACTIVATION_SCALES
    assert clamped == [quantizer._dsv4_name]
    with pytest.raises(AssertionError):  # the original is back after the block
        NVFP4QTensor.get_activation_scaling_factor(quantizer)


# ---- NVIDIA's fallback for quantizers that saw no data ----------------------------------------------


def test_uncalibrated_expert_weight_gets_its_weights_amax(calibrated):
    model = _copy(calibrated)
    found = quantizers(model)
    name = "model.layers.2.mlp.experts.gate_up_proj_weight_quantizers.1"
    expected = model.model.layers[2].mlp.experts.gate_up_proj[1].detach().abs().amax().float()
    assert torch.equal(
        found[name]._amax.float(), expected.to(found[name]._amax.dtype).float()
    )  # ModelOpt's value
    found[name]._amax = None
    fallbacks = apply_fallbacks(model, found)
    assert [(f.quantizer, f.kind) for f in fallbacks] == [(name, "weight")]
    assert fallbacks[0].amax == float(expected)


def test_uncalibrated_split_expert_input_borrows_the_largest_peer():
    """Per-expert input quantizers (ModelOpt 0.45's split experts, the seeds' layout, where experts 11,
    83, 100, 112 and 254 never saw a token): the largest calibrated amax of the same projection."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    class Expert(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj = torch.nn.Linear(16, 16)
            self.gate_proj.input_quantizer = TensorQuantizer()

    model = torch.nn.Module()
    model.mlp = torch.nn.Module()
    model.mlp.experts = torch.nn.ModuleList([Expert() for _ in range(4)])
    for i, amax in enumerate([1.0, 3.0, None, 2.0]):
        if amax is not None:
            model.mlp.experts[i].gate_proj.input_quantizer.amax = torch.tensor(amax)
    fallbacks = apply_fallbacks(model, quantizers(model))
    assert [(f.quantizer, f.amax) for f in fallbacks] == [("mlp.experts.2.gate_proj.input_quantizer", 3.0)]
    assert "mlp.experts.1.gate_proj" in fallbacks[0].source


def test_shared_input_without_amax_is_an_error_not_a_guess(calibrated):
    from pipeline.errors import DsV4Error

    model = _copy(calibrated)
    found = quantizers(model)
    found["model.layers.0.mlp.experts.down_proj_input_quantizer"]._amax = None
    with pytest.raises(DsV4Error, match="no calibrated expert of the same projection"):
        apply_fallbacks(model, found)


# ---- recovery modes ---------------------------------------------------------------------------------


def test_export_only_reproduces_the_export_without_calibrating(exports, micro_bf16, tmp_path):
    original = exports["experts"]
    again = tmp_path / "experts"
    shutil.copytree(state_dir_for(original), state_dir_for(again))
    report = quantize_checkpoint(micro_bf16, again, QuantizeOptions(recipe="experts", export_only=True))
    assert report.calibration["restored_from"] == str(state_dir_for(again))
    a, b = Checkpoint.open(original), Checkpoint.open(again)
    assert a.tensors.keys() == b.tensors.keys()
    for key in a.tensors:
        assert torch.equal(
            a.read(key).reshape(-1).view(torch.uint8), b.read(key).reshape(-1).view(torch.uint8)
        ), key


def test_validate_only_flags_a_nan_amax(exports, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    state = tmp_path / "x.calibration"
    shutil.copytree(state_dir_for(exports["experts"]), state)
    assert dsv4(["quantize", "unused", str(tmp_path / "x"), "--validate-only"]) == 0
    amax = load_file(state / "amax.safetensors")
    first = sorted(amax)[0]
    amax[first] = torch.tensor(float("nan"))
    save_file(amax, state / "amax.safetensors")
    assert dsv4(["quantize", "unused", str(tmp_path / "x"), "--validate-only"]) == 1
    assert first in capsys.readouterr().out


def test_output_inside_source_is_refused(micro_bf16, capsys):
    assert dsv4(["quantize", str(micro_bf16), str(micro_bf16 / "nvfp4")]) == 2
    assert "inside" in capsys.readouterr().err
    assert not (micro_bf16 / "nvfp4").exists()


def test_a_drifted_patch_target_is_a_one_line_refusal(micro_bf16, tmp_path, capsys, monkeypatch):
    """A target the installed ModelOpt no longer has stops `dsv4 quantize` before loading, as every other
    refusal does: one `dsv4: error:` line naming the target and the installed version, exit 2."""
    drifted = modelopt_patches.Patch(
        "drifted",
        modelopt_patches.Target("modelopt.torch.export.unified_export_hf", "_export_weight_moved", "(x)"),
        prevents="test",
        wrap=lambda f: f,
    )
    monkeypatch.setattr(modelopt_patches, "PATCHES", (drifted,))
    assert dsv4(["quantize", str(micro_bf16), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dsv4: error: installed nvidia-modelopt 0.47.0 ")
    assert "modelopt.torch.export.unified_export_hf._export_weight_moved does not exist" in err
    assert not (tmp_path / "out").exists()


def test_hf_ptq_driver_refuses_an_export_that_never_reached_the_patches(micro_bf16, tmp_path, capsys):
    """Run 11 on the node's path: hf_ptq's main() runs under the patches and its export must reach every
    one. A stand-in hf_ptq whose main() exports nothing reaches none: the run is refused, naming them."""
    from pipeline.hf_ptq import load_contract
    from tests.quantize.test_hf_ptq_driver import make_repo

    repo = make_repo(tmp_path / "modelopt", load_contract())
    argv = ["quantize", str(micro_bf16), str(tmp_path / "out"), "--driver", "hf_ptq"]
    assert dsv4([*argv, "--modelopt-repo", str(repo), "--calib-size", "8"]) == 2
    err = capsys.readouterr().err
    assert "were never reached on hf_ptq's export path" in err
    assert all(p.name in err for p in modelopt_patches.PATCHES)
