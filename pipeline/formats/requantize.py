"""MXFP4 (the release's experts) -> NVFP4 under a given global scale, re-rounded as ModelOpt rounds a
BF16 weight: ``nvfp4_quantize(mxfp4_dequantize(packed, scale), weight_scale_2=g)``, the same bytes.

This is what `dsv4 convert RELEASE --amax` does to every routed expert (the calibrated weight_scale_2
replaces the transcode's power of two), so it is most of the release->NVFP4 step's arithmetic.

Done literally, each packed byte becomes two BF16 values, then about ten float32 passes (block amax,
scale, divide, round, pack): about 80 bytes of memory traffic per byte written, 30x slower than the disk
on a CPU. But every output is a function of a few bytes. An MXFP4 value is c * 2^k (c an E2M1 code, k its
32-block's UE8M0 byte), and ModelOpt's NVFP4 rounding is elementwise given the 16-block's amax and the
global scale; the 16-block's amax is 2^k times its largest code magnitude j (one of 8). So, with the
global scale fixed:

* the e4m3 block scale is a function of (k, j);
* each output code is a function of (k, j, input code), so each output byte of (k, j, input byte).

On a CPU this module evaluates the literal arithmetic once per (k, j) that occurs, on a small table of
blocks holding every code a block with that largest magnitude can hold, and then looks each block's scale
and each byte up. The tables are the arithmetic's own output, so the bytes are the same by construction;
tests/formats/test_requantize.py checks the two ways against each other on every (k, j, byte) and on
random tensors.

The table is used only where no value can leave float32's finite range on the way (k at most 125,
global scale at least 2^-100); anything else, and every non-CPU device, takes the literal path, which also
gives the errors (a non-finite value) their usual wording.
"""

from __future__ import annotations

import numpy as np
import torch

from .e2m1 import unpack_nibbles
from .mxfp4 import MXFP4_BLOCK, _check_mxfp4, mxfp4_dequantize
from .nvfp4 import NVFP4_BLOCK, nvfp4_quantize
from .ue8m0 import UE8M0_BIAS

MAX_TABLE_K = 125  # 6 * 2^125 is BF16's largest E2M1 multiple below overflow: above, values may be inf
MIN_TABLE_GLOBAL_SCALE = 2.0**-100  # block scale x global scale stays far from float32's underflow
BYTES_PER_BLOCK = NVFP4_BLOCK // 2  # packed bytes of one 16-input NVFP4 block
CHUNK_BLOCKS = 1 << 16  # 16-blocks per lookup step (512 KiB of codes, 1 MiB of 16-bit indices): within a
# server core's L2, and few enough steps that holding the GIL between them costs converter threads little
BLOCKS_PER_SCALE = MXFP4_BLOCK // NVFP4_BLOCK  # NVFP4 16-blocks per MXFP4 32-block (UE8M0 byte)
MAGNITUDES = 8  # E2M1 magnitude indices 0..7 (bits 0-2 of a code), increasing with the magnitude
# The magnitudes a byte pair (4 codes, read as one uint16) holds, as one-hot bits 1 << j: OR-ing a 16-block's
# four pairs gives every magnitude it holds, whose highest bit is its largest (faster than a max over bytes)
_EVERY_PAIR = np.arange(1 << 16)
_ONE_HOT_MAGNITUDES = np.bitwise_or.reduce(
    [1 << ((_EVERY_PAIR >> shift) & 7) for shift in (0, 4, 8, 12)]
).astype(np.uint8)
_HIGHEST_BIT = np.array([max(0, b.bit_length() - 1) for b in range(256)], dtype=np.uint8)


def mxfp4_requantize_nvfp4(
    packed: torch.Tensor, scale: torch.Tensor, weight_scale_2: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., out, in/2] MXFP4 codes + [..., out, in/32] UE8M0 -> (packed uint8 [..., in/2], weight_scale
    e4m3 [..., in/16]): exactly ``nvfp4_quantize(mxfp4_dequantize(packed, scale), weight_scale_2=...)``."""
    _check_mxfp4(packed, scale, "mxfp4_requantize_nvfp4")
    wsf2 = torch.as_tensor(weight_scale_2, device=packed.device).float().reshape(())
    raw_scale = scale.contiguous().view(torch.uint8)
    if packed.device.type == "cpu" and packed.numel() and _table_is_exact(raw_scale, wsf2):
        return _by_table(packed.contiguous().view(torch.uint8), raw_scale, wsf2)
    q, block_scale, _ = nvfp4_quantize(mxfp4_dequantize(packed, scale, torch.bfloat16), weight_scale_2=wsf2)
    return q, block_scale


def _table_is_exact(raw_scale: torch.Tensor, wsf2: torch.Tensor) -> bool:
    g = float(wsf2)
    return (
        bool(np.isfinite(g))
        and g >= MIN_TABLE_GLOBAL_SCALE
        and int(raw_scale.max()) <= MAX_TABLE_K + UE8M0_BIAS
    )


def _tables(keys: np.ndarray, wsf2: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """For the (UE8M0 byte k, largest magnitude j) pairs ``keys`` (k * 8 + j): (byte table [len(keys) * 256]
    uint8, scale table [len(keys)] uint8), entry i * 256 + b the output byte for input byte b in a 16-block
    of key i; by the literal arithmetic on one 16-block per key."""
    k, j = keys // MAGNITUDES, keys % MAGNITUDES
    # each key's block: every code it can hold (magnitudes 0..j, both signs), padded with j (its amax)
    codes = np.arange(NVFP4_BLOCK) % MAGNITUDES  # 0..7, 0..7: magnitude index per slot
    nibbles = np.where(codes[None, :] <= j[:, None], codes[None, :], j[:, None]).astype(np.uint8)
    nibbles[:, MAGNITUDES:] |= 8  # the second half with the sign bit: -0 .. -6
    rows = torch.from_numpy(np.concatenate([nibbles, nibbles], axis=1))  # one MXFP4 32-block per key
    packed = rows[:, 0::2] | (rows[:, 1::2] << 4)
    scale = torch.from_numpy(k.astype(np.uint8)).reshape(-1, 1)
    q, block_scale, _ = nvfp4_quantize(mxfp4_dequantize(packed, scale, torch.bfloat16), weight_scale_2=wsf2)
    out_codes = unpack_nibbles(q)[:, :NVFP4_BLOCK].numpy()  # the first 16-block's codes
    code_map = np.zeros((len(keys), 16), dtype=np.uint8)  # key -> input code -> output code
    np.put_along_axis(code_map, nibbles.astype(np.int64), out_codes, axis=1)
    every_byte = np.arange(256)
    byte_table = code_map[:, every_byte & 15] | (code_map[:, every_byte >> 4] << 4)
    return byte_table.reshape(-1), block_scale[:, 0].contiguous().view(torch.uint8).numpy()


def _by_table(packed: torch.Tensor, raw_scale: torch.Tensor, wsf2: torch.Tensor):
    codes = packed.numpy().reshape(-1, BYTES_PER_BLOCK)  # one row per 16-block
    k = raw_scale.numpy().reshape(-1)  # one UE8M0 byte per two rows
    # torch's bincount, not numpy's: numpy's holds the GIL (3 ms an expert, while other converters wait)
    present = np.flatnonzero(torch.bincount(raw_scale.reshape(-1), minlength=256).numpy())
    # keys (k, j) numbered over the exponents present: with at most 32 of them (a weight spans a few
    # dozen octaves at most) the byte index fits 16 bits and the byte table 64 KiB, which stays in cache
    k_base = np.zeros(256, dtype=np.uint16 if len(present) <= 32 else np.uint32)
    k_base[present] = np.arange(len(present)) * MAGNITUDES
    keys = (present[:, None] * MAGNITUDES + np.arange(MAGNITUDES)[None, :]).reshape(-1)
    byte_table, scale_table = _tables(keys, wsf2)
    out = np.empty_like(codes)
    block_scale = np.empty(len(codes), dtype=np.uint8)
    one_hot = np.empty((CHUNK_BLOCKS, BYTES_PER_BLOCK // 2), dtype=np.uint8)
    key = np.empty((CHUNK_BLOCKS // BLOCKS_PER_SCALE, BLOCKS_PER_SCALE), dtype=k_base.dtype)
    index = np.empty((CHUNK_BLOCKS, BYTES_PER_BLOCK), dtype=k_base.dtype)
    # Every call here releases the GIL for its work (ufuncs, take with mode="clip"; np.repeat did not,
    # broadcasting does its job), and a chunk is large enough that the GIL is held for a small share of
    # the time: converter threads run this side by side
    for start in range(0, len(codes), CHUNK_BLOCKS):
        c = codes[start : start + CHUNK_BLOCKS]
        n = len(c)
        # j, the largest magnitude of each 16-block: the highest bit of its byte pairs' one-hots OR-ed
        _ONE_HOT_MAGNITUDES.take(c.view(np.uint16), out=one_hot[:n], mode="clip")
        word = one_hot[:n].view(np.uint32).reshape(-1)
        word = word | (word >> 16)
        word |= word >> 8
        keys_n = key[: n // BLOCKS_PER_SCALE]
        np.add(
            _HIGHEST_BIT.take(word.astype(np.uint8), mode="clip").reshape(-1, BLOCKS_PER_SCALE),
            k_base[k[start // BLOCKS_PER_SCALE : (start + n) // BLOCKS_PER_SCALE]][:, None],
            out=keys_n,
            casting="unsafe",
        )
        flat = keys_n.reshape(-1)
        scale_table.take(flat, out=block_scale[start : start + n], mode="clip")
        flat <<= 8
        np.bitwise_or(flat[:, None], c, out=index[:n])
        byte_table.take(index[:n], out=out[start : start + n], mode="clip")
    return (
        torch.from_numpy(out).reshape(packed.shape),
        torch.from_numpy(block_scale).view(torch.float8_e4m3fn).reshape(*packed.shape[:-1], -1),
    )


__all__ = ["mxfp4_requantize_nvfp4"]
