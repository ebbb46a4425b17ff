"""Exact number formats of the pipeline: E2M1 and nibble packing, UE8M0, FP8 block, MXFP4, NVFP4.

Plain tensors in and out, vectorised torch, CPU or CUDA (results follow the input's device). Inputs
are validated; errors say what was expected. BRIEF §2 and each module's docstring give the rules.
"""

from .e2m1 import (
    E2M1_MAGNITUDES,
    E2M1_MAX,
    E2M1_MIDPOINTS,
    e2m1_decode,
    e2m1_encode,
    pack_nibbles,
    unpack_nibbles,
)
from .fp8_block import FP8_E4M3_MAX, fp8_block_dequantize, fp8_block_quantize, tile_grid
from .mxfp4 import MXFP4_BLOCK, mxfp4_dequantize, mxfp4_quantize, mxfp4_to_fp8_block
from .nvfp4 import NVFP4_BLOCK, nvfp4_dequantize, nvfp4_global_scale, nvfp4_quantize, nvfp4_rescale
from .requantize import mxfp4_requantize_nvfp4
from .transcode import TranscodeReport, mxfp4_to_nvfp4, mxfp4_to_nvfp4_shared, transcode_exponent
from .ue8m0 import as_e8m0, ue8m0_decode, ue8m0_encode, ue8m0_products_finite

__all__ = [
    "E2M1_MAGNITUDES",
    "E2M1_MAX",
    "E2M1_MIDPOINTS",
    "FP8_E4M3_MAX",
    "MXFP4_BLOCK",
    "NVFP4_BLOCK",
    "TranscodeReport",
    "as_e8m0",
    "e2m1_decode",
    "e2m1_encode",
    "fp8_block_dequantize",
    "fp8_block_quantize",
    "mxfp4_dequantize",
    "mxfp4_quantize",
    "mxfp4_requantize_nvfp4",
    "mxfp4_to_fp8_block",
    "mxfp4_to_nvfp4",
    "mxfp4_to_nvfp4_shared",
    "nvfp4_dequantize",
    "nvfp4_global_scale",
    "nvfp4_quantize",
    "nvfp4_rescale",
    "pack_nibbles",
    "tile_grid",
    "transcode_exponent",
    "ue8m0_decode",
    "ue8m0_encode",
    "ue8m0_products_finite",
    "unpack_nibbles",
]
