"""`dsv4 convert RELEASE DST --amax AMAX` without ModelOpt: what it writes from an amax file, what it
refuses before writing (naming file and key), and --resume noticing a changed amax file. The byte
identity with today's dequant -> quantize -> convert path is tests/convert/test_convert_amax_tiny.py."""

from __future__ import annotations

import os
import re

import pytest
import torch
from safetensors.torch import save_file

from harness.amax_files import write_amax
from pipeline import mapping as M
from pipeline.checkpoint import Checkpoint, validate_checkpoint
from pipeline.convert import convert_checkpoint, plan_convert
from pipeline.errors import DsV4Error
from tests.helpers import read_tensors

pytestmark = pytest.mark.unit


def test_scales_come_from_the_amax_and_the_mtp_block_gets_the_fallback(tiny_release, tmp_path):
    amax = write_amax(tiny_release, tmp_path / "cal" / "amax.safetensors")
    out = convert_checkpoint(tiny_release, tmp_path / "out", amax=amax, progress=False).out_dir
    assert validate_checkpoint(out, full_scales=True).ok
    t = read_tensors(out)
    layers = Checkpoint.open(tiny_release).config["num_hidden_layers"]
    for w, gate_up in (("w1", True), ("w3", True), ("w2", False)):
        assert t[f"layers.1.ffn.experts.3.{w}.weight_scale_2"] == torch.tensor(
            (0.5 + 3 / 8 if gate_up else 0.25) / 2688
        )
        assert t[f"layers.1.ffn.experts.3.{w}.input_scale"] == torch.tensor((3.0 if gate_up else 6.0) / 2688)
        # the MTP block: no calibration reaches it; the largest calibrated input amax of its projection
        top = (2.0 if gate_up else 5.0) + layers - 1
        assert t[f"mtp.0.ffn.experts.0.{w}.input_scale"] == torch.tensor(top / 2688)
    rel = read_tensors(tiny_release)
    assert torch.equal(
        t["layers.0.attn.wq_a.weight"].view(torch.uint8), rel["layers.0.attn.wq_a.weight"].view(torch.uint8)
    )


def test_transcode_takes_only_the_input_amax(tiny_release, tmp_path):
    # no weight amax at all: transcoding does not need them, requantizing refuses
    config = Checkpoint.open(tiny_release).config
    amax = write_amax(tiny_release, tmp_path / "amax.safetensors")
    from safetensors.torch import load_file

    inputs = {k: v for k, v in load_file(amax).items() if k.endswith("_input_quantizer")}
    only_inputs = tmp_path / "inputs.safetensors"
    save_file(inputs, only_inputs)
    plan = plan_convert(tiny_release, amax=only_inputs, experts="transcode")
    expert_weights = [k for k in plan.layout if re.search(r"\.ffn\.experts\.\d+\.w[123]\.weight$", k)]
    assert len(expert_weights) >= 3 * config["n_routed_experts"] * config["num_hidden_layers"]
    assert {plan.jobs[plan.job_of[k]].action for k in expert_weights} == {M.TRANSCODE}
    with pytest.raises(
        DsV4Error, match=re.escape(f"{only_inputs}: ") + ".*no weight amax for layers.0.ffn.experts.0.w1"
    ):
        plan_convert(tiny_release, amax=only_inputs)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"graft_from": "RELEASE"}, "--graft-from is not taken"),
        ({"experts": "export"}, "--experts must be one of requantize, transcode"),
        ({"recipe": "most"}, "--recipe must be one of experts, full"),
    ],
)
def test_options_that_do_not_go_with_amax_are_refused(tiny_release, tmp_path, options, message):
    amax = write_amax(tiny_release, tmp_path / "amax.safetensors")
    options = {k: (tiny_release if v == "RELEASE" else v) for k, v in options.items()}
    with pytest.raises(DsV4Error, match=re.escape(message)):
        plan_convert(tiny_release, amax=amax, **options)


def test_recipe_without_amax_is_refused(tiny_release):
    with pytest.raises(DsV4Error, match="--recipe is read only with --amax"):
        plan_convert(tiny_release, recipe="full")


def test_an_amax_file_of_another_model_or_an_incomplete_one_is_refused(tiny_release, tmp_path):
    other = write_amax(
        tiny_release,
        tmp_path / "a.safetensors",
        extra={"model.layers.99.self_attn.q_a_proj.weight_quantizer": 1.0},
    )
    with pytest.raises(
        DsV4Error, match=re.escape(str(other)) + ".*layers.99.attn.wq_a, a module the release does not have"
    ):
        plan_convert(tiny_release, amax=other)
    lacking = write_amax(
        tiny_release, tmp_path / "b.safetensors", skip="model.layers.2.mlp.experts.down_proj_input_quantizer"
    )
    with pytest.raises(DsV4Error, match=re.escape("no input amax for layers.2.ffn.experts.0.w2")):
        plan_convert(tiny_release, amax=lacking)
    zero = write_amax(
        tiny_release,
        tmp_path / "c.safetensors",
        extra={"model.layers.1.mlp.experts.down_proj_weight_quantizers.2": 0.0},
    )
    with pytest.raises(
        DsV4Error, match=re.escape(f"{zero}: key model.layers.1.mlp.experts.down_proj_weight_quantizers.2")
    ):
        plan_convert(tiny_release, amax=zero)


def test_the_full_recipe_needs_every_layer_of_a_quantized_role(tiny_release, tmp_path):
    amax = write_amax(
        tiny_release,
        tmp_path / "a.safetensors",
        extra={"model.layers.0.self_attn.q_a_proj.weight_quantizer": 1.0},
    )
    with pytest.raises(
        DsV4Error,
        match=r"no weight amax for layers\.1\.attn\.wq_a, though other layers' layers\.#\.attn\.wq_a",
    ):
        plan_convert(tiny_release, amax=amax, recipe="full")
    plan = plan_convert(tiny_release, amax=amax)  # the experts recipe ignores it, and says so
    assert plan.amax["ignored_by_recipe"] == 1


def test_resume_notices_a_changed_amax_file(tiny_release, tmp_path):
    amax = write_amax(tiny_release, tmp_path / "cal" / "amax.safetensors")
    dst = tmp_path / "out"
    convert_checkpoint(tiny_release, dst, amax=amax, progress=False)
    write_amax(tiny_release, amax, extra={"model.layers.0.mlp.experts.down_proj_input_quantizer": 9.0})
    st = amax.stat()
    os.utime(amax, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(DsV4Error, match=re.escape(str(amax)) + ".*changed since"):
        convert_checkpoint(tiny_release, dst, amax=amax, resume=True, progress=False)


def test_the_output_may_not_hold_the_amax_file(tiny_release, tmp_path):
    amax = write_amax(tiny_release, tmp_path / "out" / "amax.safetensors")
    with pytest.raises(DsV4Error, match="contains the input"):
        convert_checkpoint(tiny_release, tmp_path / "out", amax=amax, progress=False)
