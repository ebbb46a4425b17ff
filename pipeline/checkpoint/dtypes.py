"""The one table of safetensors dtype strings <-> torch dtypes (and their sizes in bytes)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.errors import DsV4Error


@dataclass(frozen=True)
class DType:
    name: str  # the safetensors string, e.g. "F8_E8M0"
    torch: torch.dtype
    itemsize: int


_TABLE: tuple[DType, ...] = (
    DType("BOOL", torch.bool, 1),
    DType("U8", torch.uint8, 1),
    DType("I8", torch.int8, 1),
    DType("F8_E4M3", torch.float8_e4m3fn, 1),
    DType("F8_E5M2", torch.float8_e5m2, 1),
    DType("F8_E8M0", torch.float8_e8m0fnu, 1),  # UE8M0: byte e is 2^(e-127), 0xFF is NaN
    DType("I16", torch.int16, 2),
    DType("U16", torch.uint16, 2),
    DType("F16", torch.float16, 2),
    DType("BF16", torch.bfloat16, 2),
    DType("I32", torch.int32, 4),
    DType("U32", torch.uint32, 4),
    DType("F32", torch.float32, 4),
    DType("I64", torch.int64, 8),
    DType("U64", torch.uint64, 8),
    DType("F64", torch.float64, 8),
)

BY_NAME: dict[str, DType] = {d.name: d for d in _TABLE}
BY_TORCH: dict[torch.dtype, DType] = {d.torch: d for d in _TABLE}


def lookup(name: str, *, where: str = "") -> DType:
    """The DType for a safetensors dtype string; DsV4Error naming ``where`` if unknown."""
    try:
        return BY_NAME[name]
    except (KeyError, TypeError):
        prefix = f"{where}: " if where else ""
        raise DsV4Error(f"{prefix}unknown safetensors dtype {name!r}; known: {', '.join(BY_NAME)}") from None


def to_torch(name: str) -> torch.dtype:
    return lookup(name).torch


def from_torch(dtype: torch.dtype) -> str:
    try:
        return BY_TORCH[dtype].name
    except KeyError:
        raise DsV4Error(f"torch dtype {dtype} has no safetensors name") from None


def itemsize(name: str) -> int:
    return lookup(name).itemsize
