"""MXFP4 -> NVFP4 under a given global scale by table (pipeline/formats/requantize.py) against the literal
arithmetic it replaces, ``nvfp4_quantize(mxfp4_dequantize(...), weight_scale_2=g)`` (itself checked
against ModelOpt's NVFP4QTensor in test_modelopt_qtensors.py), bit for bit: every (UE8M0 byte, largest
magnitude, packed byte) a 16-block can hold, under global scales that put block scales at e4m3's clamps,
its subnormals and its normals; then random tensors of the release's shapes; and the cases the table
leaves to the arithmetic (large exponents, tiny global scales, other devices)."""

import re

import numpy as np
import pytest
import torch

from pipeline.formats import mxfp4_dequantize, mxfp4_requantize_nvfp4, nvfp4_global_scale, nvfp4_quantize
from pipeline.formats import requantize as R

pytestmark = pytest.mark.unit

# amax values: 448 * 6 * 2^e for a spread of e, plus ones that are not powers of two, so block scales
# land on e4m3's normals, its subnormals, the 2^-9 clamp and the 448 clamp across the exponents below
AMAXES = (1e-25, 2.0**-40, 3.3e-7, 0.01, 0.7, 1.0, 5.0, 2688.0, 1e5, 7.5e20, 1e30)


def _literal(packed, scale, global_scale):
    q, block, _ = nvfp4_quantize(mxfp4_dequantize(packed, scale, torch.bfloat16), weight_scale_2=global_scale)
    return q, block


def _same(got, want) -> bool:
    return (
        got[0].dtype == want[0].dtype == torch.uint8
        and got[1].dtype == want[1].dtype == torch.float8_e4m3fn
        and got[0].shape == want[0].shape
        and got[1].shape == want[1].shape
        and torch.equal(got[0], want[0])
        and torch.equal(got[1].view(torch.uint8), want[1].view(torch.uint8))
    )


def _every_block() -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 [rows, 16 bytes] + UE8M0 [rows, 1] holding, under every exponent the table takes, 16-blocks
    of every largest magnitude j with every packed byte whose codes are at most j (seven a block, the
    eighth byte j itself, so the block's amax is j's)."""
    blocks = []
    for j in range(8):
        fits = [b for b in range(256) if (b & 7) <= j and (b >> 4 & 7) <= j]
        for i in range(0, len(fits), 7):
            part = fits[i : i + 7]
            blocks.append(part + [j] * (8 - len(part)))
    if len(blocks) % 2:
        blocks.append([0] * 8)  # an all-zero block: a 32-block is two 16-blocks under one exponent
    per_k = torch.tensor(blocks, dtype=torch.uint8).reshape(-1, 16)
    ks = torch.arange(R.MAX_TABLE_K + 127 + 1, dtype=torch.int32).to(torch.uint8)  # UE8M0 bytes 0..252
    packed = per_k.repeat(len(ks), 1)
    scale = ks.repeat_interleave(len(per_k)).reshape(-1, 1)
    return packed.view(torch.int8), scale


@pytest.mark.parametrize("amax", AMAXES)
def test_every_exponent_magnitude_and_byte_under_each_global_scale(amax):
    packed, scale = _every_block()
    g = nvfp4_global_scale(amax)
    assert R._table_is_exact(scale, g)  # the table path, not the fallback, is what is compared
    got = R._by_table(packed.view(torch.uint8), scale, g)
    assert _same(got, _literal(packed, scale, g))


@pytest.mark.parametrize("seed", range(4))
def test_random_expert_weights_of_the_release_shapes(seed):
    gen = torch.Generator().manual_seed(seed)
    for rows, cols in ((512, 7168), (7168, 384), (64, 96)):
        packed = torch.randint(0, 256, (rows, cols // 2), generator=gen, dtype=torch.uint8).view(torch.int8)
        scale = torch.randint(100, 130, (rows, cols // 32), generator=gen, dtype=torch.uint8)
        g = nvfp4_global_scale(float(torch.rand((), generator=gen)) * 4 + 0.01)
        for s in (scale, scale.view(torch.float8_e8m0fnu)):
            assert _same(mxfp4_requantize_nvfp4(packed, s, g), _literal(packed, s, g))


def test_batched_experts_keep_their_shape():
    gen = torch.Generator().manual_seed(7)
    packed = torch.randint(0, 256, (3, 4, 64), generator=gen, dtype=torch.uint8)
    scale = torch.randint(110, 130, (3, 4, 4), generator=gen, dtype=torch.uint8)
    g = nvfp4_global_scale(1.5)
    assert _same(mxfp4_requantize_nvfp4(packed, scale, g), _literal(packed, scale, g))


def test_wide_exponent_spreads_take_32_bit_indices():
    # more than 32 exponents in one tensor: the byte index no longer fits 16 bits
    gen = torch.Generator().manual_seed(3)
    packed = torch.randint(0, 256, (256, 512), generator=gen, dtype=torch.uint8)
    scale = torch.randint(0, 240, (256, 32), generator=gen, dtype=torch.uint8)
    assert len(np.unique(scale.numpy())) > 32
    g = nvfp4_global_scale(3.0)
    assert _same(mxfp4_requantize_nvfp4(packed, scale, g), _literal(packed, scale, g))


def test_the_cpu_takes_the_table_and_never_the_weights_in_bf16(monkeypatch):
    # the literal path dequantizes the whole tensor; the table path only its small table of blocks
    seen = []
    real = R.mxfp4_dequantize
    monkeypatch.setattr(R, "mxfp4_dequantize", lambda p, s, d: seen.append(p.shape) or real(p, s, d))
    packed = torch.randint(0, 256, (1024, 2048), dtype=torch.uint8)
    scale = torch.full((1024, 128), 120, dtype=torch.uint8)
    mxfp4_requantize_nvfp4(packed, scale, nvfp4_global_scale(1.0))
    assert seen and all(shape[0] <= 256 * 8 for shape in seen)


@pytest.mark.parametrize(
    ("top_scale_byte", "amax", "why"),
    [
        (127 + 126, 1.0, "an exponent above 125: 6 * 2^126 overflows BF16"),
        (127 + 125, 1e-33, "a global scale below 2^-100"),
    ],
)
def test_outside_the_table_the_arithmetic_decides_with_its_own_errors(top_scale_byte, amax, why):
    packed = torch.full((2, 16), 0x77, dtype=torch.uint8)  # every code 6: the largest value
    scale = torch.tensor([[120], [top_scale_byte]], dtype=torch.uint8)
    g = nvfp4_global_scale(amax)
    assert not R._table_is_exact(scale, g), why
    try:
        want = _literal(packed, scale, g)
    except ValueError as err:
        with pytest.raises(ValueError, match=re.escape(str(err))):
            mxfp4_requantize_nvfp4(packed, scale, g)
    else:
        assert _same(mxfp4_requantize_nvfp4(packed, scale, g), want)
