"""The transcode's fast paths against what they replaced (pipeline/formats/transcode.py).

* The all-zero-block mask, tested 8 bytes at a time as int64 words, against unpacking every nibble:
  each of the 256 byte values at each of a block's 16 byte positions in an otherwise ±0 block, and
  random blocks, aligned and starting off an 8-byte boundary.
* An exact transcode no longer computes the weight's values for its report: the report must be the
  one the values would give (relative error 0, max error 0).
"""

import pytest
import torch

from pipeline.formats import mxfp4_quantize, mxfp4_to_nvfp4
from pipeline.formats.e2m1 import unpack_nibbles
from pipeline.formats.transcode import _nonzero_blocks

pytestmark = pytest.mark.unit


def _reference(packed: torch.Tensor) -> torch.Tensor:
    """The mask as it was computed before: every code unpacked, its magnitude bits tested."""
    codes = unpack_nibbles(packed).unflatten(-1, (-1, 32))
    return ((codes & 0x7) != 0).any(dim=-1)


def test_every_byte_at_every_position():
    background = torch.tensor([0x00, 0x08, 0x80, 0x88], dtype=torch.uint8)  # the four ±0 pairs
    blocks = background.repeat(4).repeat(256 * 16, 1)  # [4096, 16], all ±0
    rows = torch.arange(256 * 16)
    blocks[rows, rows % 16] = (rows // 16).to(torch.uint8)  # byte value v at position p
    packed = blocks.reshape(64, -1)  # 64 blocks a row
    got = _nonzero_blocks(packed)
    assert torch.equal(got, _reference(packed))
    assert int(got.sum()) == 16 * (256 - 4)  # only the four ±0 bytes leave a block zero


def test_random_blocks_aligned_and_not():
    gen = torch.Generator().manual_seed(3)
    sparse = torch.randint(0, 256, (40, 17 * 16), generator=gen, dtype=torch.uint8)
    sparse &= torch.tensor([0x88, 0x77], dtype=torch.uint8)[
        (torch.rand(sparse.shape, generator=gen) < 0.02).long()
    ]
    for view in (sparse, sparse[:, 16:], sparse.reshape(-1)[8:-8].reshape(-1, 16)):  # the last: offset 8
        assert torch.equal(_nonzero_blocks(view.view(torch.int8)), _reference(view))
    odd = sparse.reshape(-1)[4:-12].reshape(-1, 16)  # starts 4 bytes into a word: the byte-wise path
    assert odd.storage_offset() % 8 == 4
    assert torch.equal(_nonzero_blocks(odd), _reference(odd))


def test_exact_transcode_report_is_what_the_values_give():
    w = torch.randn(64, 256) * torch.logspace(-1, 1, 64).unsqueeze(1)
    packed, scale = mxfp4_quantize(w)
    _, _, _, report = mxfp4_to_nvfp4(packed, scale)
    assert report.exact and report.requantized_blocks == 0
    assert report.max_abs_error == 0.0 and report.relative_error == 0.0
    assert report.exact_blocks + report.zero_blocks == report.blocks
