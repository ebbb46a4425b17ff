"""The output, planned up front from headers: shards, each an ordered list of (key, dtype, shape), so
every size, the header bytes, the disk need and the final index are known before any data is produced."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property

from pipeline.errors import DsV4Error

from . import dtypes
from .reader import INDEX_NAME

DEFAULT_METADATA = {"format": "pt"}
DEFAULT_SHARD_TEMPLATE = "model-{index:05d}-of-{count:05d}.safetensors"
GIB = 1024**3


@dataclass(frozen=True)
class PlannedTensor:
    key: str
    dtype: str  # safetensors string, e.g. "U8"
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        dtypes.lookup(self.dtype, where=f"planned key {self.key}")
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtypes.itemsize(self.dtype)


@dataclass(frozen=True)
class ShardPlan:
    name: str
    tensors: tuple[PlannedTensor, ...]
    metadata: dict[str, str] | None = field(default_factory=lambda: dict(DEFAULT_METADATA))

    @cached_property
    def header_bytes(self) -> bytes:
        """8-byte length + JSON header, padded with spaces to a multiple of 8 (as safetensors does).

        Deterministic: entries in plan order, compact separators, so the same plan gives the same bytes.
        """
        header: dict = {}
        if self.metadata is not None:
            header["__metadata__"] = dict(self.metadata)
        pos = 0
        for t in self.tensors:
            header[t.key] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
            pos += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        return len(raw).to_bytes(8, "little") + raw

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def file_size(self) -> int:
        return len(self.header_bytes) + self.data_bytes


@dataclass(frozen=True)
class OutputPlan:
    shards: tuple[ShardPlan, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "shards", tuple(self.shards))
        names: set[str] = set()
        seen: dict[str, str] = {}
        for sh in self.shards:
            if sh.name in names or "/" in sh.name or sh.name.startswith(".") or sh.name == INDEX_NAME:
                raise DsV4Error(f"plan: bad or repeated shard name {sh.name!r}")
            names.add(sh.name)
            for t in sh.tensors:
                if t.key in seen:
                    raise DsV4Error(f"plan: key {t.key} planned in both {seen[t.key]} and {sh.name}")
                seen[t.key] = sh.name

    @property
    def total_bytes(self) -> int:
        """Bytes of all shard files (headers included)."""
        return sum(sh.file_size for sh in self.shards)

    @property
    def tensor_bytes(self) -> int:
        return sum(sh.data_bytes for sh in self.shards)

    @property
    def weight_map(self) -> dict[str, str]:
        return {t.key: sh.name for sh in self.shards for t in sh.tensors}

    @cached_property
    def index_bytes(self) -> bytes:
        wm = dict(sorted(self.weight_map.items()))
        return (
            json.dumps({"metadata": {"total_size": self.tensor_bytes}, "weight_map": wm}, indent=2) + "\n"
        ).encode()

    @cached_property
    def digest(self) -> str:
        h = hashlib.sha256()
        for sh in self.shards:
            h.update(sh.name.encode() + b"\0" + sh.header_bytes)
        return h.hexdigest()


def plan_shards(
    tensors: Iterable[PlannedTensor],
    *,
    max_shard_bytes: int = 5 * GIB,
    name_template: str = DEFAULT_SHARD_TEMPLATE,
    metadata: dict[str, str] | None = None,
) -> OutputPlan:
    """Split tensors, in the given order, into shards of at most ``max_shard_bytes`` of data each
    (a single larger tensor gets a shard of its own). Names follow ``name_template`` (index from 1)."""
    groups: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + t.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    groups = [g for g in groups if g] or [[]]
    md = dict(DEFAULT_METADATA) if metadata is None else metadata
    n = len(groups)
    return OutputPlan(
        tuple(
            ShardPlan(name_template.format(index=i + 1, count=n), tuple(g), md) for i, g in enumerate(groups)
        )
    )
