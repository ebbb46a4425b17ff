"""Sharded safetensors checkpoints: header-only reading, planned crash-safe writing, validation,
layout classification and summaries.

reader       Checkpoint.open(path), read_header, read_index, read_tensor, locate
writer       write_checkpoint -> WriteResult (crash-safe, resumable), on the modules below it:
output_plan  PlannedTensor, ShardPlan, OutputPlan, plan_shards
producer     per_tensor, AcrossShards (a producer streaming every shard as one), Converters (how
             many converter threads on the CPU and on the GPU), producer_pool (their thread pools: torch
             threads per converter, a CUDA stream each, does not hold up Ctrl-C), Ahead (how far its
             jobs run ahead of the writer)
digest       the journal's shard digest (sha256 by pieces, on threads), checked again on --resume
atomic       write_bytes_atomic, write_json_atomic, copy_file_atomic (temp + fsync + rename)
lock         LOCK_NAME, one run per output folder
journal      JOURNAL_NAME, the input fingerprints, what --resume keeps and --overwrite may remove
validate     validate_checkpoint -> ValidationReport (all problems), ensure_valid
layout       Layout, classify_layout, require_layout, role_of, ROLES
inspect      summarize, format_summary
dtypes       the one safetensors <-> torch dtype table
folder       files_to_copy (a folder's non-tensor files), free_disk
"""

from __future__ import annotations

import importlib

# name -> (submodule, its name there). Loaded on first use (PEP 562), so that a module needing only the
# layout table or the dtype names (`dsv4 validate --help`) does not import torch with the reader.
_EXPORTS: dict[str, tuple[str, str]] = {
    "AcrossShards": ("producer", "AcrossShards"),
    "Ahead": ("producer", "Ahead"),
    "CONFIG_NAME": ("reader", "CONFIG_NAME"),
    "Checkpoint": ("reader", "Checkpoint"),
    "Converters": ("producer", "Converters"),
    "DTYPES": ("dtypes", "BY_NAME"),
    "INDEX_NAME": ("reader", "INDEX_NAME"),
    "JOURNAL_NAME": ("journal", "JOURNAL_NAME"),
    "LOCK_NAME": ("lock", "LOCK_NAME"),
    "Layout": ("layout", "Layout"),
    "is_within": ("writer", "is_within"),
    "LayoutInfo": ("layout", "LayoutInfo"),
    "OutputPlan": ("output_plan", "OutputPlan"),
    "PlannedTensor": ("output_plan", "PlannedTensor"),
    "Problem": ("validate", "Problem"),
    "ROLES": ("layout", "ROLES"),
    "ShardHeader": ("reader", "ShardHeader"),
    "ShardPlan": ("output_plan", "ShardPlan"),
    "TensorInfo": ("reader", "TensorInfo"),
    "ValidationReport": ("validate", "ValidationReport"),
    "WriteResult": ("writer", "WriteResult"),
    "classify_layout": ("layout", "classify_layout"),
    "copy_file_atomic": ("atomic", "copy_file_atomic"),
    "ensure_valid": ("validate", "ensure_valid"),
    "files_to_copy": ("folder", "files_to_copy"),
    "format_summary": ("inspect", "format_summary"),
    "free_disk": ("folder", "free_disk"),
    "from_torch": ("dtypes", "from_torch"),
    "locate": ("reader", "locate"),
    "per_tensor": ("producer", "per_tensor"),
    "plan_shards": ("output_plan", "plan_shards"),
    "producer_pool": ("producer", "producer_pool"),
    "read_config": ("reader", "read_config"),
    "read_header": ("reader", "read_header"),
    "read_index": ("reader", "read_index"),
    "read_tensor": ("reader", "read_tensor"),
    "require_layout": ("layout", "require_layout"),
    "role_of": ("layout", "role_of"),
    "summarize": ("inspect", "summarize"),
    "to_torch": ("dtypes", "to_torch"),
    "validate_checkpoint": ("validate", "validate_checkpoint"),
    "write_bytes_atomic": ("atomic", "write_bytes_atomic"),
    "write_checkpoint": ("writer", "write_checkpoint"),
    "write_json_atomic": ("atomic", "write_json_atomic"),
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
