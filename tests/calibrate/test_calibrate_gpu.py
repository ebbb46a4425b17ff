"""`dsv4 calibrate --device cuda` on the micro model: the layer-wise amax equal, bit for bit, those of
whole-model calibration on the same GPU (`dsv4 quantize --device cuda` on the BF16 copy), for both
recipes, and the report gives each layer's peak device memory. The CPU test (test_calibrate.py) cannot
show that the GPU's kernels, which layer-wise and whole-model calibration share shape for shape, keep
the equality."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from pipeline.calibrate import CalibrateOptions, calibrate_release
from pipeline.quantize import QuantizeOptions, quantize_checkpoint, state_dir_for

pytestmark = [pytest.mark.gpu, pytest.mark.quant]


@pytest.mark.parametrize("recipe", ["experts", "full"])
def test_layerwise_amax_on_cuda_equal_whole_model_calibration_on_cuda(
    micro_release, micro_bf16, tmp_path, recipe
):
    shape = dict(samples=8, seq_len=256, batch=4)
    dst = tmp_path / "export"
    quantize_checkpoint(
        micro_bf16,
        dst,
        QuantizeOptions(recipe=recipe, calib_size=8, calib_seq=256, calib_batch=4, device="cuda"),
    )
    amax = tmp_path / "amax.safetensors"
    report = calibrate_release(
        micro_release, amax, CalibrateOptions(recipe=recipe, device="cuda", progress=False, **shape)
    )
    ours, theirs = load_file(amax), load_file(state_dir_for(dst) / "amax.safetensors")
    assert sorted(ours) == sorted(theirs)
    mismatched = [k for k in theirs if ours[k].view(torch.int32).item() != theirs[k].view(torch.int32).item()]
    assert mismatched == []
    assert report.device.startswith("cuda")
    assert all(r.peak_device_bytes and r.peak_device_bytes > 0 for r in report.layers)
