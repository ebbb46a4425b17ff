"""`dsv4 dequant` output against transformers 5.23's own FP8/MXFP4 dequantization, tensor by tensor.

transformers' `Fp8Dequantize` is the op it applies when it loads the release with
FineGrainedFP8Config(dequantize=True): an independent path to the same BF16 values.

It derives the tile from the scale grid (block = dim // grid), which is right only when every FP8 dim
divides by 128: for a partial edge tile (dim 192 -> grid 2) it uses 96-wide tiles. Every FP8 dim of V4
Pro divides by 128 (tests/checkpoint/test_release_layout.py holds the real shapes), so the comparison below
covers those tensors, and a second test pins the partial-tile behaviour so a change shows up.
"""

import types

import pytest
import torch

from pipeline.checkpoint import Checkpoint
from pipeline.dequant import dequantize_checkpoint
from pipeline.formats import fp8_block_dequantize

pytestmark = pytest.mark.quant


def _transformers_dequant():
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    cfg = FineGrainedFP8Config(weight_block_size=[128, 128])
    return Fp8Dequantize(types.SimpleNamespace(quantization_config=cfg))._dequantize_one


def _tiles_whole(info) -> bool:
    return info.dtype != "F8_E4M3" or all(d % 128 == 0 for d in info.shape)


def test_dequant_output_equals_transformers_dequantization(tiny_release, tmp_path):
    dequant = _transformers_dequant()
    dequantize_checkpoint(tiny_release, tmp_path / "out", progress=False)
    src, out = Checkpoint.open(tiny_release), Checkpoint.open(tmp_path / "out")
    checked = {"F8_E4M3": 0, "I8": 0}
    for key, info in src.tensors.items():
        scale_key = key.removesuffix(".weight") + ".scale"
        if not key.endswith(".weight") or scale_key not in src.tensors or not _tiles_whole(info):
            continue
        expected = dequant(src.read(key), src.read(scale_key), output_dtype=torch.bfloat16)
        assert torch.equal(out.read(key).view(torch.uint8), expected.view(torch.uint8)), key
        checked[info.dtype] += 1
    assert checked["F8_E4M3"] > 0 and checked["I8"] > 0, checked


def test_transformers_uses_dim_over_grid_tiles_for_partial_edges():
    dequant = _transformers_dequant()
    q = torch.ones(256, 192).to(torch.float8_e4m3fn)
    scale = torch.tensor([[127, 128], [127, 128]], dtype=torch.uint8).view(torch.float8_e8m0fnu)  # 1, 2
    ours = fp8_block_dequantize(q, scale)
    theirs = dequant(q, scale, output_dtype=torch.bfloat16)
    assert ours[0, 100].item() == 1.0 and ours[0, 150].item() == 2.0  # 128-wide tiles, partial edge
    assert theirs[0, 100].item() == 2.0  # transformers: 96-wide tiles, so column 100 is in tile 1
