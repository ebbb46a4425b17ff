"""E2M1 and nibble packing, exhaustively: every code, every byte, every tie. One test per case (-k picks it).

Expected values are derived from the E2M1 definition (1 sign, 2 exponent, 1 mantissa bit, bias 1),
not read from the table the implementation uses.
"""

import math

import pytest
import torch

from pipeline.formats import e2m1_decode, e2m1_encode, pack_nibbles, unpack_nibbles
from pipeline.formats.e2m1 import block_square_sums

pytestmark = pytest.mark.unit


def e2m1_value_from_bits(code: int) -> float:
    sign = -1.0 if code & 0b1000 else 1.0
    exponent, mantissa = (code >> 1) & 0b11, code & 0b1
    magnitude = mantissa * 0.5 if exponent == 0 else 2.0 ** (exponent - 1) * (1 + mantissa / 2)
    return math.copysign(magnitude, sign)


ALL_CODES = range(16)
POSITIVE_VALUES = sorted({abs(e2m1_value_from_bits(c)) for c in range(8)})


def _ties():
    """(tie value, expected code): each midpoint between neighbours goes to the even code."""
    for lo_code in range(7):
        lo, hi = e2m1_value_from_bits(lo_code), e2m1_value_from_bits(lo_code + 1)
        yield (lo + hi) / 2, lo_code if lo_code % 2 == 0 else lo_code + 1


TIES = list(_ties())


@pytest.mark.parametrize("code", ALL_CODES, ids=lambda c: f"code{c:02d}")
def test_decode_each_code(code):
    got = e2m1_decode(torch.tensor([code], dtype=torch.uint8)).item()
    expected = e2m1_value_from_bits(code)
    assert got == expected and math.copysign(1, got) == math.copysign(1, expected)


@pytest.mark.parametrize("code", ALL_CODES, ids=lambda c: f"code{c:02d}")
def test_encode_each_code_value_round_trips(code):
    value = torch.tensor([e2m1_value_from_bits(code)], dtype=torch.float32)
    assert e2m1_encode(value).item() == code


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_decode_dtypes_are_exact(dtype):
    codes = torch.arange(16, dtype=torch.uint8)
    assert torch.equal(e2m1_decode(codes, dtype).float(), e2m1_decode(codes))


def test_tie_table_is_the_documented_one():
    assert TIES == [(0.25, 0), (0.75, 2), (1.25, 2), (1.75, 4), (2.5, 4), (3.5, 6), (5.0, 6)]


@pytest.mark.parametrize("tie,expected", TIES, ids=[f"tie{t}" for t, _ in TIES])
def test_each_tie_rounds_to_even(tie, expected):
    assert e2m1_encode(torch.tensor([tie])).item() == expected
    assert e2m1_encode(torch.tensor([-tie])).item() == expected | 0b1000


@pytest.mark.parametrize("tie,expected", TIES, ids=[f"tie{t}" for t, _ in TIES])
def test_each_tie_neighbourhood_rounds_to_nearest(tie, expected):
    below = torch.nextafter(torch.tensor([tie]), torch.tensor([0.0]))
    above = torch.nextafter(torch.tensor([tie]), torch.tensor([10.0]))
    lo_code = max(c for c in range(8) if e2m1_value_from_bits(c) < tie)
    assert e2m1_encode(below).item() == lo_code
    assert e2m1_encode(above).item() == lo_code + 1


@pytest.mark.parametrize("value", [6.0, 6.5, 7.0, 100.0, 1e30, math.inf], ids=lambda v: f"sat{v}")
def test_saturates_at_six(value):
    assert e2m1_encode(torch.tensor([value])).item() == 7
    assert e2m1_encode(torch.tensor([-value])).item() == 15


def test_negative_zero_keeps_its_sign():
    assert e2m1_encode(torch.tensor([-0.0])).item() == 8
    assert e2m1_encode(torch.tensor([0.0])).item() == 0
    # a negative that rounds to zero is -0 too
    assert e2m1_encode(torch.tensor([-0.1])).item() == 8
    assert math.copysign(1, e2m1_decode(torch.tensor([8], dtype=torch.uint8)).item()) == -1


def test_nan_is_rejected():
    with pytest.raises(ValueError, match="NaN"):
        e2m1_encode(torch.tensor([1.0, math.nan]))


def test_non_float_input_is_rejected():
    with pytest.raises(TypeError, match="expected dtype"):
        e2m1_encode(torch.tensor([1, 2]))


def test_decode_rejects_codes_above_15():
    with pytest.raises(ValueError, match="4-bit"):
        e2m1_decode(torch.tensor([16], dtype=torch.uint8))


@pytest.mark.parametrize("byte", range(256), ids=lambda b: f"byte{b:02x}")
def test_each_packed_byte(byte):
    low, high = byte & 0x0F, byte >> 4
    packed = torch.tensor([byte], dtype=torch.uint8)
    assert unpack_nibbles(packed).tolist() == [low, high]  # element 2i low nibble, 2i+1 high
    assert pack_nibbles(torch.tensor([low, high], dtype=torch.uint8)).tolist() == [byte]
    # int8 storage (as the DeepSeek release keeps experts) holds the same bits
    assert unpack_nibbles(packed.view(torch.int8)).tolist() == [low, high]


def test_pack_rejects_odd_length():
    with pytest.raises(ValueError, match="multiple of 2"):
        pack_nibbles(torch.zeros(3, 5, dtype=torch.uint8))


def test_pack_keeps_leading_dims():
    codes = torch.arange(16, dtype=torch.uint8).repeat(3, 2)
    assert pack_nibbles(codes).shape == (3, 16)
    assert torch.equal(unpack_nibbles(pack_nibbles(codes)), codes)


@pytest.mark.parametrize("block", [2, 16, 32])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8])
def test_block_square_sums_of_every_byte_in_every_position(block, dtype):
    # every byte value at every offset within a block, summed from the decoded values squared one by one
    every = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    rows = torch.stack([every.roll(i) for i in range(block // 2)], dim=-1).reshape(-1, 4, block // 2)
    rows = rows.reshape(-1, 4 * (block // 2))  # [..., 4 blocks]
    got = block_square_sums(rows.view(dtype), block)
    values = [[e2m1_decode(c).item() for c in unpack_nibbles(r)] for r in rows]
    want = torch.tensor(
        [[sum(v * v for v in row[i : i + block]) for i in range(0, len(row), block)] for row in values],
        dtype=torch.float32,
    )
    assert got.dtype == torch.float32 and torch.equal(got, want)


def test_block_square_sums_keeps_leading_dims_and_refuses_partial_blocks():
    packed = torch.randint(0, 256, (2, 3, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    assert block_square_sums(packed, 16).shape == (2, 3, 8)
    with pytest.raises(ValueError):
        block_square_sums(packed[..., :60], 16)
