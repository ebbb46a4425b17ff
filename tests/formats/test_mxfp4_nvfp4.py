"""MXFP4 (the release's experts) and NVFP4 (ModelOpt's export): layouts, rules and exactness properties.

The byte-for-byte comparisons against ModelOpt, transformers and vLLM live in tests/formats/ too (test_modelopt_qtensors.py, test_transformers_fp8.py, test_vllm_nvfp4.py).
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.formats import (
    E2M1_MAGNITUDES,
    e2m1_decode,
    fp8_block_dequantize,
    mxfp4_dequantize,
    mxfp4_to_fp8_block,
    nvfp4_dequantize,
    nvfp4_global_scale,
    nvfp4_quantize,
    pack_nibbles,
    tile_grid,
    ue8m0_decode,
    unpack_nibbles,
)

pytestmark = pytest.mark.unit


def random_mxfp4(rows, cols, exponent_lo, exponent_hi, seed, zero_block_fraction=0.0):
    """Packed int8 codes [rows, cols/2] and UE8M0 scales [rows, cols/32] with exponents in [lo, hi]."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(16, (rows, cols), generator=gen, dtype=torch.int64).to(torch.uint8)
    if zero_block_fraction:
        zero = torch.rand(rows, cols // 32, generator=gen) < zero_block_fraction
        codes.view(rows, cols // 32, 32)[zero] = 0
    exponents = torch.randint(exponent_lo, exponent_hi + 1, (rows, cols // 32), generator=gen)
    scale = (exponents + 127).to(torch.uint8).view(torch.float8_e8m0fnu)
    return pack_nibbles(codes).view(torch.int8), scale


# -- MXFP4 -----------------------------------------------------------------------------------------


def test_mxfp4_dequantize_is_code_value_times_block_scale():
    packed, scale = random_mxfp4(4, 64, -3, 3, seed=0)
    out = mxfp4_dequantize(packed, scale, torch.float32)
    codes = unpack_nibbles(packed)
    for r in range(4):
        for c in range(64):
            expected = (
                e2m1_decode(codes[r, c : c + 1]).item() * ue8m0_decode(scale[r, c // 32 : c // 32 + 1]).item()
            )
            assert out[r, c].item() == expected


def test_mxfp4_bf16_output_is_exact():
    packed, scale = random_mxfp4(64, 256, -20, 10, seed=1)
    assert torch.equal(
        mxfp4_dequantize(packed, scale).float(), mxfp4_dequantize(packed, scale, torch.float32)
    )


def test_mxfp4_leading_dims_are_kept():
    packed, scale = random_mxfp4(6, 64, -2, 2, seed=2)
    stacked = mxfp4_dequantize(packed.view(2, 3, 32), scale.view(2, 3, 2), torch.float32)
    assert torch.equal(stacked.view(6, 64), mxfp4_dequantize(packed, scale, torch.float32))


@pytest.mark.parametrize(
    "packed_shape,scale_shape,match",
    [((4, 16), (4, 2), r"expected shape \(4, 1\)"), ((4, 8), (4, 1), "multiple of the MXFP4 block")],
    ids=["scale-shape", "block"],
)
def test_mxfp4_bad_shapes(packed_shape, scale_shape, match):
    with pytest.raises(ValueError, match=match):
        mxfp4_dequantize(
            torch.zeros(packed_shape, dtype=torch.int8), torch.zeros(scale_shape, dtype=torch.uint8)
        )


def test_mxfp4_rejects_float_packed():
    with pytest.raises(TypeError, match="int8, uint8"):
        mxfp4_dequantize(torch.zeros(4, 16), torch.zeros(4, 1, dtype=torch.uint8))


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 200),
    st.integers(1, 12),
    st.integers(-60, 50),
    st.integers(0, 14),
    st.integers(0, 2**31 - 1),
    st.sampled_from([0.0, 0.3]),
)
def test_mxfp4_to_fp8_is_exact_when_exponents_span_at_most_14_octaves(rows, blocks, lo, spread, seed, zeros):
    packed, scale = random_mxfp4(rows, 32 * blocks, lo, lo + spread, seed, zero_block_fraction=zeros)
    q, fp8_scale = mxfp4_to_fp8_block(packed, scale)
    assert q.dtype == torch.float8_e4m3fn and fp8_scale.dtype == torch.float8_e8m0fnu
    assert fp8_scale.shape == tile_grid((rows, 32 * blocks))
    assert torch.equal(
        fp8_block_dequantize(q, fp8_scale, dtype=torch.float32),
        mxfp4_dequantize(packed, scale, torch.float32),
    )


def test_mxfp4_to_fp8_beyond_14_octaves_rounds_the_smallest_values():
    codes = torch.zeros(1, 64, dtype=torch.uint8)
    codes[0, 0] = 7  # 6 * 2^0 in block 0
    codes[0, 32] = 1  # 0.5 * 2^-15 in block 1: 15 octaves below
    scale = torch.tensor([[127, 127 - 15]], dtype=torch.uint8)
    q, fp8_scale = mxfp4_to_fp8_block(pack_nibbles(codes).view(torch.int8), scale)
    out = fp8_block_dequantize(q, fp8_scale, dtype=torch.float32)
    assert out[0, 0].item() == 6.0
    assert out[0, 32].item() != 0.5 * 2.0**-15  # below e4m3's smallest subnormal at this tile scale


# -- NVFP4 -----------------------------------------------------------------------------------------


def test_nvfp4_layout_and_global_scale():
    torch.manual_seed(0)
    w = torch.randn(32, 64, dtype=torch.bfloat16)
    packed, ws, ws2 = nvfp4_quantize(w)
    assert packed.dtype == torch.uint8 and packed.shape == (32, 32)
    assert ws.dtype == torch.float8_e4m3fn and ws.shape == (32, 4)
    assert ws2.dtype == torch.float32 and ws2.shape == ()
    assert ws2.item() == (w.abs().max().float() / 2688.0).item()


def test_nvfp4_block_scale_is_block_amax_over_six_global_scales():
    torch.manual_seed(1)
    w = torch.randn(8, 32)
    _, ws, ws2 = nvfp4_quantize(w)
    expected = (w.view(8, 2, 16).abs().amax(-1) / (6.0 * ws2)).to(torch.float8_e4m3fn)
    assert torch.equal(ws.view(torch.uint8), expected.view(torch.uint8))


def test_nvfp4_weight_scale_2_override_and_amax_agree():
    torch.manual_seed(2)
    w = torch.randn(4, 32)
    by_amax = nvfp4_quantize(w, amax=torch.tensor(10.0))
    by_scale = nvfp4_quantize(w, weight_scale_2=nvfp4_global_scale(10.0))
    for a, b in zip(by_amax, by_scale, strict=True):
        assert (
            torch.equal(a.view(torch.uint8), b.view(torch.uint8))
            if a.dtype != torch.float32
            else torch.equal(a, b)
        )


def test_nvfp4_zero_block_gets_scale_one_times_global():
    w = torch.zeros(2, 32)
    w[0, :16] = 3.0
    packed, ws, ws2 = nvfp4_quantize(w)
    assert ws.float()[0, 1].item() == 1.0 and ws.float()[1].tolist() == [1.0, 1.0]
    assert not nvfp4_dequantize(packed, ws, ws2, torch.float32)[1].any()


def test_nvfp4_block_scale_clamps_at_smallest_subnormal():
    w = torch.zeros(1, 32)
    w[0, 0] = 1000.0
    w[0, 16] = 1e-6  # its block scale would be far below 2^-9
    _, ws, _ = nvfp4_quantize(w)
    assert ws.float()[0, 1].item() == 2.0**-9


def test_nvfp4_negative_zero_encodes_as_plus_zero_like_modelopt():
    w = torch.tensor([[-0.0] + [1.0] * 15])
    packed, _, _ = nvfp4_quantize(w)
    assert unpack_nibbles(packed)[0, 0].item() == 0


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: nvfp4_quantize(torch.zeros(4, 24)), "multiple of 16"),
        (lambda: nvfp4_quantize(torch.zeros(4, 32)), "all-zero"),
        (lambda: nvfp4_quantize(torch.ones(4, 32), amax=1.0, weight_scale_2=1.0), "not both"),
        (lambda: nvfp4_quantize(torch.full((4, 32), float("nan"))), "finite"),
        (
            lambda: nvfp4_dequantize(
                torch.zeros(4, 16, dtype=torch.uint8), torch.zeros(4, 1).to(torch.float8_e4m3fn), 1.0
            ),
            r"expected shape \(4, 2\)",
        ),
        (lambda: nvfp4_dequantize(torch.zeros(4, 16, dtype=torch.int8), torch.zeros(4, 2), 1.0), "uint8"),
    ],
    ids=["block", "zero", "both", "nan", "scale-shape", "packed-dtype"],
)
def test_nvfp4_bad_inputs(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", [(0, 0, 0), (2, 5, 47), (1, 3, 16)], ids=["first", "last", "block-start"])
@pytest.mark.parametrize("given_scale", [None, "amax", "weight_scale_2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nvfp4_one_non_finite_value_anywhere_is_named(bad, where, given_scale, dtype):
    """The finiteness check reads the block maxima, not every element: one NaN or inf in any block, with
    or without a given global scale, must still raise and name its index."""
    w = torch.randn(3, 6, 48).to(dtype)
    w[where] = bad
    kwargs = {"amax": {"amax": 1.0}, "weight_scale_2": {"weight_scale_2": 0.01}}.get(given_scale, {})
    with pytest.raises(ValueError, match=rf"non-finite at index \[{', '.join(map(str, where))}\]"):
        nvfp4_quantize(w, **kwargs)


@st.composite
def nvfp4_grid_tensor(draw):
    """A tensor on the NVFP4 grid: codes x e4m3 block scale x power-of-two global scale, each block
    holding a +-6 so that its block amax reproduces its scale."""
    rows, blocks = draw(st.integers(1, 40)), draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(16, (rows, blocks, 16), generator=gen, dtype=torch.int64).to(torch.uint8)
    codes[codes == 8] = 0  # -0 comes back as +0 (ModelOpt's sign rule); tested on its own above
    codes[..., 0] = torch.where(torch.rand(rows, blocks, generator=gen) < 0.5, 7, 15).to(torch.uint8)
    # normal e4m3 block scales (2^-6 .. 448): bytes 0x08..0x7E
    ws = torch.randint(0x08, 0x7F, (rows, blocks), generator=gen, dtype=torch.int64).to(torch.uint8)
    ws2 = torch.tensor(2.0 ** draw(st.integers(-20, 4)))
    return pack_nibbles(codes.view(rows, blocks * 16)), ws.view(torch.float8_e4m3fn), ws2


@settings(max_examples=60, deadline=None)
@given(nvfp4_grid_tensor(), st.sampled_from([torch.float32, torch.bfloat16]))
def test_nvfp4_grid_values_survive_quantize_dequantize(grid, dtype):
    packed, ws, ws2 = grid
    w = nvfp4_dequantize(packed, ws, ws2, dtype)
    packed2, ws_2, ws2_2 = nvfp4_quantize(w, weight_scale_2=ws2)
    assert torch.equal(ws_2.view(torch.uint8), ws.view(torch.uint8))
    assert torch.equal(packed2, packed)
    assert torch.equal(nvfp4_dequantize(packed2, ws_2, ws2_2, dtype), w)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 64), st.integers(1, 8), st.integers(0, 2**31 - 1), st.floats(1e-3, 1e3))
def test_nvfp4_each_element_rounds_to_a_nearest_grid_point(rows, blocks, seed, magnitude):
    w = torch.randn((rows, blocks * 16), generator=torch.Generator().manual_seed(seed)) * magnitude
    packed, ws, ws2 = nvfp4_quantize(w)
    step = (ws.float() * ws2).repeat_interleave(16, dim=1)
    x = (w / step).clamp(-6, 6)
    got = nvfp4_dequantize(packed, ws, ws2, torch.float32) / step
    grid = torch.tensor(E2M1_MAGNITUDES)
    nearest = (x.abs()[..., None] - grid).abs().min(-1).values
    assert torch.allclose((got.abs() - x.abs()).abs(), nearest, rtol=0, atol=1e-5)


# -- MXFP4 quantize (how the tiny release-layout checkpoints get their experts) ---------------------


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 8), st.integers(-100, 100), st.integers(0, 2**31 - 1))
def test_mxfp4_grid_values_survive_quantize_dequantize(rows, blocks, lo, seed):
    """Codes with a +-6 in every block (so the block's scale is recoverable) round-trip exactly, -0 too."""
    from pipeline.formats import mxfp4_quantize

    packed, scale = random_mxfp4(rows, 32 * blocks, lo, lo + 20, seed)
    codes = unpack_nibbles(packed).view(rows, blocks, 32)
    codes[..., 0] = 7
    packed = pack_nibbles(codes.view(rows, -1)).view(torch.int8)
    w = mxfp4_dequantize(packed, scale, torch.float32)
    packed2, scale2 = mxfp4_quantize(w)
    assert torch.equal(scale2.view(torch.uint8), scale.view(torch.uint8))
    assert torch.equal(packed2, packed)


def test_mxfp4_quantize_scale_is_smallest_power_of_two_that_fits():
    from pipeline.formats import mxfp4_quantize

    w = torch.zeros(1, 96)
    w[0, 0] = 6.0  # fits 2^0 exactly
    w[0, 32] = 6.0000005  # just above: needs 2^1
    packed, scale = mxfp4_quantize(w)  # block 2 is all zero: byte 0 (2^-127)
    assert scale.view(torch.uint8).tolist() == [[127, 128, 0]]
    assert mxfp4_dequantize(packed, scale, torch.float32)[0, 32].item() == 6.0


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 64), st.integers(1, 6), st.integers(0, 2**31 - 1), st.floats(1e-4, 1e4))
def test_mxfp4_quantize_rounds_to_nearest(rows, blocks, seed, magnitude):
    from pipeline.formats import mxfp4_quantize

    w = torch.randn((rows, 32 * blocks), generator=torch.Generator().manual_seed(seed)) * magnitude
    packed, scale = mxfp4_quantize(w)
    step = ue8m0_decode(scale).repeat_interleave(32, dim=1)
    got = mxfp4_dequantize(packed, scale, torch.float32) / step
    x = w / step
    assert (x.abs() <= 6).all()  # nothing saturates
    grid = torch.tensor(E2M1_MAGNITUDES)
    nearest = (x.abs()[..., None] - grid).abs().min(-1).values
    assert torch.allclose((got - x).abs(), nearest, rtol=0, atol=1e-6)
