"""UE8M0, exhaustively: all 256 bytes both ways, and interop with torch.float8_e8m0fnu."""

import math

import pytest
import torch

from pipeline.formats import as_e8m0, ue8m0_decode, ue8m0_encode

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("byte", range(256), ids=lambda b: f"byte{b:02x}")
def test_decode_each_byte(byte):
    got = ue8m0_decode(torch.tensor([byte], dtype=torch.uint8)).item()
    if byte == 0xFF:
        assert math.isnan(got)
    else:
        assert got == math.ldexp(1.0, byte - 127)


@pytest.mark.parametrize("byte", range(255), ids=lambda b: f"byte{b:02x}")
def test_encode_each_power_of_two(byte):
    value = torch.tensor([math.ldexp(1.0, byte - 127)], dtype=torch.float32)
    assert ue8m0_encode(value).item() == byte
    assert ue8m0_encode(value, rounding="ceil").item() == byte


def test_nan_encodes_to_ff():
    assert ue8m0_encode(torch.tensor([math.nan])).item() == 0xFF


def test_decode_agrees_with_torch_e8m0_for_every_byte():
    every = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    ours = ue8m0_decode(every)
    torchs = every.view(torch.float8_e8m0fnu).float()
    assert torch.equal(ours[:255], torchs[:255])
    assert math.isnan(ours[255].item()) and math.isnan(torchs[255].item())


def test_encode_agrees_with_torch_cast_on_powers_of_two():
    values = torch.tensor([math.ldexp(1.0, k) for k in range(-127, 128)], dtype=torch.float32)
    assert torch.equal(ue8m0_encode(values), values.to(torch.float8_e8m0fnu).view(torch.uint8))


def test_e8m0_dtype_in_and_out_keeps_bytes():
    every = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    assert torch.equal(as_e8m0(every).view(torch.uint8), every)
    assert torch.equal(ue8m0_decode(as_e8m0(every))[:255], ue8m0_decode(every)[:255])
    values = ue8m0_decode(every[:255])
    assert torch.equal(ue8m0_encode(values, dtype=torch.float8_e8m0fnu).view(torch.uint8), every[:255])


@pytest.mark.parametrize(
    "value,expected_exponent",
    [(1.0, 0), (1.0000001, 1), (0.75, 0), (0.5, -1), (3.0, 2), (448.0, 9), (1e-40, -127)],
    ids=str,
)
def test_ceil_rounds_up_to_a_power_of_two(value, expected_exponent):
    got = ue8m0_encode(torch.tensor([value]), rounding="ceil").item()
    assert got == expected_exponent + 127


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf], ids=str)
def test_rejects_non_positive_or_infinite(bad):
    with pytest.raises(ValueError, match="positive finite"):
        ue8m0_encode(torch.tensor([bad]))


def test_exact_rejects_non_power_of_two():
    with pytest.raises(ValueError, match="not a power of two"):
        ue8m0_encode(torch.tensor([3.0]))


def test_rejects_out_of_range():
    with pytest.raises(ValueError, match="outside UE8M0"):
        ue8m0_encode(torch.tensor([2.0**127 * 1.5]), rounding="ceil")


def test_decode_rejects_other_dtypes():
    with pytest.raises(TypeError, match="float8_e8m0fnu"):
        ue8m0_decode(torch.tensor([1.0]))
