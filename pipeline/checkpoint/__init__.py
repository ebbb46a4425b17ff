"""Sharded safetensors checkpoints: header-only reading, planned crash-safe writing, validation,
layout classification and summaries.

reader    Checkpoint.open(path), read_header, read_index, read_tensor, locate
writer    PlannedTensor, ShardPlan, OutputPlan, plan_shards, write_checkpoint, copy_file_atomic,
          producer_pool (a producer's thread pool that does not hold up Ctrl-C)
validate  validate_checkpoint -> ValidationReport (all problems), ensure_valid
layout    Layout, classify_layout, require_layout, role_of, ROLES
inspect   summarize, format_summary
dtypes    the one safetensors <-> torch dtype table
folder    files_to_copy (a folder's non-tensor files), free_disk
"""

from __future__ import annotations

import importlib

# name -> (submodule, its name there). Loaded on first use (PEP 562), so that a module needing only the
# layout table or the dtype names (`dsv4 validate --help`) does not import torch with the reader.
_EXPORTS: dict[str, tuple[str, str]] = {
    "CONFIG_NAME": ("reader", "CONFIG_NAME"),
    "Checkpoint": ("reader", "Checkpoint"),
    "DTYPES": ("dtypes", "BY_NAME"),
    "INDEX_NAME": ("reader", "INDEX_NAME"),
    "JOURNAL_NAME": ("writer", "JOURNAL_NAME"),
    "LOCK_NAME": ("writer", "LOCK_NAME"),
    "Layout": ("layout", "Layout"),
    "LayoutInfo": ("layout", "LayoutInfo"),
    "OutputPlan": ("writer", "OutputPlan"),
    "PlannedTensor": ("writer", "PlannedTensor"),
    "Problem": ("validate", "Problem"),
    "ROLES": ("layout", "ROLES"),
    "ShardHeader": ("reader", "ShardHeader"),
    "ShardPlan": ("writer", "ShardPlan"),
    "TensorInfo": ("reader", "TensorInfo"),
    "ValidationReport": ("validate", "ValidationReport"),
    "WriteResult": ("writer", "WriteResult"),
    "classify_layout": ("layout", "classify_layout"),
    "copy_file_atomic": ("writer", "copy_file_atomic"),
    "ensure_valid": ("validate", "ensure_valid"),
    "files_to_copy": ("folder", "files_to_copy"),
    "format_summary": ("inspect", "format_summary"),
    "free_disk": ("folder", "free_disk"),
    "from_torch": ("dtypes", "from_torch"),
    "locate": ("reader", "locate"),
    "per_tensor": ("writer", "per_tensor"),
    "plan_shards": ("writer", "plan_shards"),
    "producer_pool": ("writer", "producer_pool"),
    "read_config": ("reader", "read_config"),
    "read_header": ("reader", "read_header"),
    "read_index": ("reader", "read_index"),
    "read_tensor": ("reader", "read_tensor"),
    "require_layout": ("layout", "require_layout"),
    "role_of": ("layout", "role_of"),
    "summarize": ("inspect", "summarize"),
    "to_torch": ("dtypes", "to_torch"),
    "validate_checkpoint": ("validate", "validate_checkpoint"),
    "write_bytes_atomic": ("writer", "write_bytes_atomic"),
    "write_checkpoint": ("writer", "write_checkpoint"),
    "write_json_atomic": ("writer", "write_json_atomic"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    try:
        module, attr = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f".{module}", __name__), attr)
    globals()[name] = value  # next time without __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
