"""MXFP4 -> NVFP4 transcode: exact inside the 18-octave e4m3 window, one test per edge case."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.formats import (
    mxfp4_dequantize,
    mxfp4_quantize,
    mxfp4_to_nvfp4,
    nvfp4_dequantize,
    pack_nibbles,
    transcode_exponent,
    unpack_nibbles,
)

pytestmark = pytest.mark.unit


def blocks(exponents, codes_per_block=None, rows=1):
    """One row of 32-blocks with the given UE8M0 exponents (None: an all-zero block)."""
    codes = torch.zeros(rows, 32 * len(exponents), dtype=torch.uint8)
    scale = torch.zeros(rows, len(exponents), dtype=torch.uint8)
    for b, k in enumerate(exponents):
        if k is None:
            scale[:, b] = 127
            continue
        codes[:, 32 * b : 32 * (b + 1)] = (
            torch.arange(32, dtype=torch.uint8) % 16 if codes_per_block is None else codes_per_block
        )
        codes[:, 32 * b] = 7  # a 6 in every nonzero block
        scale[:, b] = k + 127
    return pack_nibbles(codes).view(torch.int8), scale.view(torch.float8_e8m0fnu)


def exact_equal(packed, scale, out):
    p2, ws, ws2, _ = out
    return torch.equal(
        nvfp4_dequantize(p2, ws, ws2, torch.float32), mxfp4_dequantize(packed, scale, torch.float32)
    )


@pytest.mark.parametrize("rel", range(-12, 9), ids=lambda r: f"k-m={r}")
def test_each_block_exponent_at_the_window_edges(rel):
    """The top block fixes m = k_top - 8; a second block at k = m + rel is exact iff rel >= -9."""
    k_top = 3
    m = k_top - 8
    packed, scale = blocks([k_top, m + rel])
    out = mxfp4_to_nvfp4(packed, scale)
    report = out[3]
    assert report.m == m and float(out[2]) == 2.0**m
    if rel >= -9:
        assert report.exact and report.exact_blocks == 2
        assert torch.equal(out[0], packed.view(torch.uint8))  # bytes copied unchanged
        assert exact_equal(packed, scale, out)
    else:
        assert report.requantized_blocks == 1 and report.exact_blocks == 1
        assert out[1].float()[0, 2:].tolist() == [2.0**-9, 2.0**-9]  # the smallest e4m3 scale
        assert report.max_abs_error <= 0.5 * 2.0 ** (m - 9)


@pytest.mark.parametrize("spread", [0, 1, 16, 17], ids=lambda s: f"spread{s}")
def test_spreads_up_to_17_octaves_are_exact(spread):
    packed, scale = blocks([-20, -20 + spread, None, -20 + spread // 2], rows=3)
    out = mxfp4_to_nvfp4(packed, scale)
    assert out[3].exact and out[3].zero_blocks == 3
    assert exact_equal(packed, scale, out)


def test_negative_zero_block_stays_negative_zero():
    packed, scale = blocks([0, None])
    codes = unpack_nibbles(packed.view(torch.uint8))
    codes[0, 32:] = 8  # -0 everywhere in the zero block
    packed = pack_nibbles(codes).view(torch.int8)
    p2, ws, ws2, report = mxfp4_to_nvfp4(packed, scale)
    got = nvfp4_dequantize(p2, ws, ws2, torch.float32)[0, 32:]
    assert report.zero_blocks == 1 and torch.signbit(got).all() and not got.any()


def test_w1_and_w3_share_m_from_both():
    w1 = blocks([5, 0])
    w3 = blocks([9, 2])
    m = transcode_exponent(w1, w3)
    assert m == 9 - 8
    for packed, scale in (w1, w3):
        out = mxfp4_to_nvfp4(packed, scale, m=m)
        assert float(out[2]) == 2.0**m and out[3].exact and exact_equal(packed, scale, out)


def test_an_m_that_overflows_the_top_block_is_refused():
    packed, scale = blocks([10])
    with pytest.raises(ValueError, match="above the e4m3 range"):
        mxfp4_to_nvfp4(packed, scale, m=1)


def test_nan_scale_is_refused():
    packed, scale = blocks([0])
    scale = torch.full_like(scale.view(torch.uint8), 0xFF).view(torch.float8_e8m0fnu)
    with pytest.raises(ValueError, match="NaN"):
        mxfp4_to_nvfp4(packed, scale)


def test_realistic_expert_transcodes_exactly_where_requantizing_does_not():
    """The experts recipe dequantizes the release and requantizes to NVFP4 (6.5 % weight error on the
    demo tensor); the transcode of the same MXFP4 bytes adds none."""
    from pipeline.demo import realistic_expert
    from pipeline.formats import nvfp4_quantize

    packed, scale = mxfp4_quantize(realistic_expert(512, 7168, seed=0))
    release = mxfp4_dequantize(packed, scale, torch.float32)
    out = mxfp4_to_nvfp4(packed, scale)
    assert out[3].exact and torch.equal(nvfp4_dequantize(*out[:3], torch.float32), release)
    requant = nvfp4_dequantize(*nvfp4_quantize(release.to(torch.bfloat16)), torch.float32)
    assert (requant - release).norm() / release.norm() > 0.03


@settings(max_examples=50, deadline=None)
@given(
    st.integers(1, 8),
    st.lists(st.one_of(st.none(), st.integers(-110, 110)), min_size=1, max_size=6),
    st.integers(0, 2**31 - 1),
)
def test_property_dequantization_is_bit_identical_whenever_the_report_says_exact(rows, exps, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(16, (32,), generator=gen, dtype=torch.int64).to(torch.uint8)
    packed, scale = blocks(exps, codes_per_block=codes, rows=rows)
    out = mxfp4_to_nvfp4(packed, scale)
    nonzero = [k for k in exps if k is not None]
    assert out[3].exact == (not nonzero or max(nonzero) - min(nonzero) <= 17)
    if out[3].exact:
        assert exact_equal(packed, scale, out)
        assert torch.equal(out[0], packed.view(torch.uint8))
    else:
        # only blocks below the window changed: their values are at most 6 * 2^(m-10) = 3 steps of
        # 2^(m-9), where the E2M1 grid is at most 1 apart, so each moved by at most half a step
        step = 2.0 ** (out[3].m - 9)
        diff = nvfp4_dequantize(*out[:3], torch.float32) - mxfp4_dequantize(packed, scale, torch.float32)
        assert diff.abs().max() <= 0.5 * step
