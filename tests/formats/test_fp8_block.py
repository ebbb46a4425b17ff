"""FP8 block quantization: tile geometry (partial edges), scale rules, and exactness properties."""

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pipeline.formats import FP8_E4M3_MAX, fp8_block_dequantize, fp8_block_quantize, tile_grid, ue8m0_decode

pytestmark = pytest.mark.unit

SHAPES = [(128, 128), (256, 384), (130, 250), (1, 1), (127, 129), (300, 7)]


def per_element_scale(scale: torch.Tensor, shape, block=(128, 128)) -> torch.Tensor:
    """scale[i // br, j // bc] for every (i, j), spelled with index arithmetic rather than tiles."""
    s = scale.float() if scale.dtype == torch.float32 else ue8m0_decode(scale)
    rows = torch.arange(shape[0]) // block[0]
    cols = torch.arange(shape[1]) // block[1]
    return s[rows[:, None], cols[None, :]]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("scale_fmt", ["ue8m0", "float32"])
def test_dequantize_is_element_times_its_tile_scale(shape, scale_fmt):
    torch.manual_seed(0)
    w = torch.randn(shape) * 3
    q, scale = fp8_block_quantize(w, scale_fmt=scale_fmt)
    assert q.dtype == torch.float8_e4m3fn and q.shape == shape and q.is_contiguous()
    assert scale.shape == tile_grid(shape)
    assert scale.dtype == (torch.float8_e8m0fnu if scale_fmt == "ue8m0" else torch.float32)
    expected = q.float() * per_element_scale(scale, shape)
    assert torch.equal(fp8_block_dequantize(q, scale, dtype=torch.float32), expected)
    assert torch.equal(fp8_block_dequantize(q, scale), expected.to(torch.bfloat16))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_ue8m0_scale_is_the_smallest_power_of_two_that_fits(shape):
    torch.manual_seed(1)
    w = torch.randn(shape) * 0.01
    _q, scale = fp8_block_quantize(w, scale_fmt="ue8m0")
    s = per_element_scale(scale, shape)
    ratio = (w.abs() / s).amax()
    assert ratio <= FP8_E4M3_MAX
    # halving any tile's scale would overflow that tile: check per tile
    for (ti, tj), s_tile in zip(
        [(i, j) for i in range(scale.shape[0]) for j in range(scale.shape[1])],
        ue8m0_decode(scale).flatten().tolist(),
        strict=True,
    ):
        tile = w[ti * 128 : (ti + 1) * 128, tj * 128 : (tj + 1) * 128]
        assert tile.abs().max().item() / (s_tile / 2) > FP8_E4M3_MAX


def test_partial_edge_tile_uses_only_its_own_elements():
    w = torch.zeros(130, 130)
    w[129, 129] = 1.0  # alone in the corner tile
    w[0, 0] = 448.0
    _, scale = fp8_block_quantize(w, scale_fmt="float32")
    assert scale[0, 0].item() == 1.0
    assert scale[1, 1].item() == pytest.approx(1.0 / 448.0, rel=1e-7)
    assert scale[0, 1].item() == 1.0 and scale[1, 0].item() == 1.0  # all-zero tiles get scale 1


def test_zero_tile_gets_unit_scale():
    q, scale = fp8_block_quantize(torch.zeros(128, 256))
    assert ue8m0_decode(scale).tolist() == [[1.0, 1.0]]
    assert not q.float().any()


def test_values_beyond_range_saturate_not_nan():
    w = torch.full((128, 128), 1.0)
    w[0, 0] = 1e6
    q, _scale = fp8_block_quantize(w, scale_fmt="ue8m0")
    assert torch.isfinite(q.float()).all()


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: fp8_block_quantize(torch.zeros(4)), "2-D"),
        (lambda: fp8_block_quantize(torch.zeros(4, 4, dtype=torch.int32)), "expected dtype"),
        (lambda: fp8_block_quantize(torch.zeros(4, 4), scale_fmt="e8m0"), "scale_fmt"),
        (lambda: fp8_block_quantize(torch.tensor([[math.inf]])), "finite"),
        (lambda: fp8_block_quantize(torch.zeros(4, 4), block=(0, 128)), "positive"),
        (
            lambda: fp8_block_dequantize(torch.zeros(256, 256).to(torch.float8_e4m3fn), torch.ones(1, 2)),
            r"expected shape \(2, 2\)",
        ),
        (lambda: fp8_block_dequantize(torch.zeros(4, 4), torch.ones(1, 1)), "float8_e4m3fn"),
    ],
    ids=["1d", "int", "fmt", "inf", "block", "scale-shape", "q-dtype"],
)
def test_bad_inputs_say_what_was_expected(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


# -- properties ------------------------------------------------------------------------------------

# every finite e4m3 byte except -0 ... +448; NaN bytes 0x7F and 0xFF excluded
FINITE_E4M3_BYTES = [b for b in range(256) if b not in (0x7F, 0xFF)]


@st.composite
def canonical_fp8_checkpoint(draw):
    """Random e4m3 bytes and UE8M0 tile scales, each tile holding a value above 224 in magnitude.

    A tile whose largest |q| is above 224 is in the form a UE8M0 quantizer produces; one whose largest
    is 224 or less is also exactly representable one scale lower, which a requantizer prefers.
    """
    rows, cols = draw(st.integers(1, 300)), draw(st.integers(1, 300))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    table = torch.tensor(FINITE_E4M3_BYTES, dtype=torch.uint8)
    q = table[torch.randint(len(table), (rows, cols), generator=gen)].view(torch.float8_e4m3fn)
    tr, tc = tile_grid((rows, cols))
    big = torch.tensor([240.0, -256.0, 448.0, -448.0, 320.0]).to(torch.float8_e4m3fn)
    for i in range(tr):
        for j in range(tc):
            q[i * 128, j * 128] = big[(i + j) % len(big)]
    exponents = torch.randint(-40, 20, (tr, tc), generator=gen)
    scale = (exponents + 127).to(torch.uint8).view(torch.float8_e8m0fnu)
    return q, scale


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(canonical_fp8_checkpoint(), st.sampled_from([torch.float32, torch.bfloat16]))
def test_requantizing_a_dequantized_ue8m0_checkpoint_reproduces_its_bytes(ckpt, dtype):
    q, scale = ckpt
    w = fp8_block_dequantize(q, scale, dtype=dtype)
    q2, scale2 = fp8_block_quantize(w, scale_fmt="ue8m0")
    assert torch.equal(scale2.view(torch.uint8), scale.view(torch.uint8))
    assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8))


def test_tile_peaking_at_224_requantizes_to_the_other_exact_encoding():
    q = torch.full((128, 128), 224.0).to(torch.float8_e4m3fn)
    scale = torch.tensor([[127]], dtype=torch.uint8).view(torch.float8_e8m0fnu)
    w = fp8_block_dequantize(q, scale, dtype=torch.float32)
    q2, scale2 = fp8_block_quantize(w)
    assert ue8m0_decode(scale2).item() == 0.5 and q2.float().max().item() == 448.0
    assert torch.equal(fp8_block_dequantize(q2, scale2, dtype=torch.float32), w)  # same values


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 260),
    st.integers(1, 260),
    st.integers(0, 2**31 - 1),
    st.floats(1e-6, 1e4),
    st.sampled_from(["ue8m0", "float32"]),
)
def test_quantize_error_is_within_half_an_e4m3_step(rows, cols, seed, magnitude, scale_fmt):
    w = torch.randn((rows, cols), generator=torch.Generator().manual_seed(seed)) * magnitude
    assume(torch.isfinite(w).all())
    q, scale = fp8_block_quantize(w, scale_fmt=scale_fmt)
    s = per_element_scale(scale, (rows, cols))
    x = w / s  # what was rounded
    err = (q.float() - x).abs()
    # e4m3 spacing at |x|: 2^(floor(log2|x|) - 3), and 2^-9 below the normal range (2^-6)
    spacing = torch.exp2(torch.floor(torch.log2(x.abs().clamp(min=2.0**-6))) - 3)
    # The quantizer rounds w * (448 / amax); a float32 scale stores that factor's rounded reciprocal, so
    # w / scale can sit an ulp or two from the value actually rounded (on a tie, that flips the side).
    slack = 0.0 if scale_fmt == "ue8m0" else x.abs() * 2.0**-21
    assert (err <= spacing / 2 * (1 + 1e-6) + slack).all()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize(
    "where", [(0, 0), (299, 199), (130, 131)], ids=["first", "last-partial-tile", "inner"]
)
def test_one_non_finite_value_anywhere_is_named(bad, where, monkeypatch):
    """The finiteness check reads the tile maxima, not every element: one NaN or inf in any tile of any
    strip (a tiny strip size forces one tile row per strip), partial edge tiles included, must still
    raise and name its index."""
    from pipeline.formats import fp8_block as FB

    monkeypatch.setattr(FB, "STRIP_ELEMENTS", 1)
    w = torch.randn(300, 200).to(torch.bfloat16)
    w[where] = bad
    with pytest.raises(ValueError, match=rf"non-finite at index \[{where[0]}, {where[1]}\]"):
        FB.fp8_block_quantize(w)


@pytest.mark.parametrize("shape", [(300, 200), (1000, 129), (129, 64)], ids=str)
@pytest.mark.parametrize("fmt", ["ue8m0", "float32"])
def test_strips_of_tile_rows_give_the_same_bytes(shape, fmt, monkeypatch):
    """Large weights are quantized in strips of whole tile rows (fp8_block.STRIP_ELEMENTS); a tiny strip
    size forces one tile row per strip, partial edge tiles included, and must change no byte."""
    from pipeline.formats import fp8_block as FB

    g = torch.Generator().manual_seed(shape[0])
    w = (torch.randn(shape, generator=g) * torch.rand(shape, generator=g) * 3).to(torch.bfloat16)
    q, scale = FB.fp8_block_quantize(w, scale_fmt=fmt)
    calls = []
    real = FB._quantize
    monkeypatch.setattr(FB, "_quantize", lambda *a: calls.append(a[0].shape) or real(*a))
    monkeypatch.setattr(FB, "STRIP_ELEMENTS", 1)
    q2, scale2 = FB.fp8_block_quantize(w, scale_fmt=fmt)
    assert len(calls) == -(-shape[0] // 128)  # really in strips
    assert torch.equal(q.view(torch.uint8), q2.view(torch.uint8))
    assert torch.equal(scale.view(torch.uint8), scale2.view(torch.uint8))
