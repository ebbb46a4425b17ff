"""`dsv4 calibrate` on the micro model through real ModelOpt 0.47 on a CPU.

The promise of issue 16: with the same calibration batches, the amax calibrated one layer at a time
from the release equal, bit for bit, those ModelOpt's whole-model calibration records on the BF16 copy
(`dsv4 dequant` then `dsv4 quantize`, its DST.calibration/amax.safetensors), key for key, for both
recipes. 4 samples x 256 tokens: past the ratio-128 compressor's window and the sliding window of 16,
in two batches. Then what that equality rests on (each layer built as from_pretrained builds it; the
eager experts), and the memory promise (a layer is freed before the next is read).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.calibrate import CalibrateOptions, calibrate_release
from pipeline.calibrate.amax_file import read_metadata
from pipeline.errors import DsV4Error
from pipeline.quantize import QuantizeOptions, quantize_checkpoint, state_dir_for

pytestmark = [pytest.mark.tiny, pytest.mark.quant]

SAMPLES, SEQ, BATCH = 4, 256, 2


def calibrate_options(recipe: str, **kw) -> CalibrateOptions:
    return CalibrateOptions(
        recipe=recipe, samples=SAMPLES, seq_len=SEQ, batch=BATCH, device="cpu", progress=False, **kw
    )


@pytest.fixture(scope="module")
def whole_model_amax(micro_bf16: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{recipe: dsv4 quantize's amax snapshot} of the micro release's BF16 copy, same batches."""
    root = tmp_path_factory.mktemp("whole-model")
    out = {}
    for recipe in ("experts", "full"):
        dst = root / recipe
        opts = QuantizeOptions(
            recipe=recipe, calib_size=SAMPLES, calib_seq=SEQ, calib_batch=BATCH, device="cpu"
        )
        quantize_checkpoint(micro_bf16, dst, opts)
        out[recipe] = state_dir_for(dst) / "amax.safetensors"
    return out


@pytest.mark.parametrize("recipe", ["experts", "full"])
def test_layerwise_amax_equal_whole_model_calibration_bit_for_bit(
    micro_release, whole_model_amax, tmp_path, recipe
):
    amax = tmp_path / f"{recipe}.safetensors"
    report = calibrate_release(micro_release, amax, calibrate_options(recipe))
    ours, theirs = load_file(amax), load_file(whole_model_amax[recipe])
    assert sorted(ours) == sorted(theirs)
    assert len(theirs) == {"experts": 40, "full": 124}[recipe]  # every quantizer the recipe enables
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype == torch.float32 and ours[key].shape == value.shape == (), key
        assert ours[key].view(torch.int32).item() == value.view(torch.int32).item(), key  # the bits
    assert report.complete and report.amax_keys == len(theirs) and report.kept_layers == 0
    assert [r.layer for r in report.layers] == [0, 1, 2, 3]
    assert all(r.peak_device_bytes is None for r in report.layers)  # CPU: no device peak to report
    assert report.mtp_tensors_skipped > 0  # the micro release has an MTP block; it is not calibrated
    meta = read_metadata(amax)
    assert meta["recipe"] == recipe and meta["calibration"]["seq_len"] == SEQ and meta["layers"] == 4
    assert not (tmp_path / f".{amax.name}.work").exists()  # the work folder goes once AMAX is in place


def test_without_eager_experts_the_experts_input_quantizers_see_no_data(micro_release, tmp_path, monkeypatch):
    """Why loop.force_eager_experts exists: ModelOpt intercepts the fused experts only on transformers'
    eager experts path, and switches to it only when it quantizes a whole model."""
    import pipeline.calibrate.loop as loop

    monkeypatch.setattr(loop, "force_eager_experts", lambda config: None)
    with pytest.raises(
        DsV4Error,
        match=r"model\.layers\.0\.mlp\.experts\.gate_up_proj_input_quantizer: input quantizer saw no",
    ):
        calibrate_release(micro_release, tmp_path / "a.safetensors", calibrate_options("experts"))


def test_each_layer_is_built_as_from_pretrained_builds_it(micro_release, micro_bf16):
    """Every tensor of every layer, parameters and buffers (the computed rotary tables too), has the
    dtype and the bits transformers gives it loading the BF16 copy: the float32 keep modules included."""
    from pipeline.calibrate.skeleton import Placer, build_skeleton, skeleton_config
    from pipeline.calibrate.weights import LoadTimes, layer_sources, load_layer
    from pipeline.checkpoint import Checkpoint, read_config
    from pipeline.quantize import load_bf16_model

    reference = load_bf16_model(micro_bf16, torch.device("cpu"))
    model = build_skeleton(skeleton_config(read_config(micro_release)))
    assert model.config.to_dict() | {"_name_or_path": ""} == reference.config.to_dict() | {
        "_name_or_path": ""
    }
    placer = Placer(model)
    sources = layer_sources(Checkpoint.open(micro_release))
    float32: set[str] = set()
    for i, ref_layer in enumerate(reference.model.layers):
        layer = load_layer(model, placer, i, sources.by_layer[i], torch.device("cpu"), LoadTimes())
        ours = dict(layer.named_parameters()) | dict(layer.named_buffers())
        theirs = dict(ref_layer.named_parameters()) | dict(ref_layer.named_buffers())
        assert sorted(ours) == sorted(theirs)
        for name, t in theirs.items():
            assert ours[name].dtype == t.dtype and torch.equal(ours[name], t), f"layer {i}: {name}"
            assert isinstance(ours[name], torch.nn.Parameter) == isinstance(t, torch.nn.Parameter), name
            if t.dtype == torch.float32:
                float32.add(name.rsplit(".", 1)[0])
    assert {"attn_hc", "ffn_hc", "input_layernorm"} <= {n.split(".")[0] for n in float32}


def test_a_layer_still_referenced_when_the_next_is_read_stops_the_run(micro_release, tmp_path, monkeypatch):
    """The memory promise is checked, not assumed: if anything kept layer 0 alive, layer 1 is not read."""
    import pipeline.calibrate.loop as loop

    kept = []
    real = loop.calibrate_layer

    def keeping(index, layer, *args):
        kept.append(layer)
        return real(index, layer, *args)

    monkeypatch.setattr(loop, "calibrate_layer", keeping)
    with pytest.raises(DsV4Error, match=r"layer 0: \d+ of its tensors are still referenced"):
        calibrate_release(micro_release, tmp_path / "a.safetensors", calibrate_options("experts"))
    assert len(kept) == 1
