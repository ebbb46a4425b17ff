"""Sharded safetensors checkpoints: header-only reading, planned crash-safe writing, validation,
layout classification and summaries.

reader    Checkpoint.open(path), read_header, read_index, read_tensor, locate
writer    PlannedTensor, ShardPlan, OutputPlan, plan_shards, write_checkpoint, copy_file_atomic,
          producer_pool (a producer's thread pool that does not hold up Ctrl-C)
validate  validate_checkpoint -> ValidationReport (all problems), ensure_valid
layout    Layout, classify_layout, require_layout, role_of, ROLES
inspect   summarize, format_summary
dtypes    the one safetensors <-> torch dtype table
"""

from .dtypes import BY_NAME as DTYPES
from .dtypes import from_torch, to_torch
from .inspect import format_summary, summarize
from .layout import ROLES, Layout, LayoutInfo, classify_layout, require_layout, role_of
from .reader import (
    CONFIG_NAME,
    INDEX_NAME,
    Checkpoint,
    ShardHeader,
    TensorInfo,
    locate,
    read_config,
    read_header,
    read_index,
    read_tensor,
)
from .validate import Problem, ValidationReport, ensure_valid, validate_checkpoint
from .writer import (
    JOURNAL_NAME,
    LOCK_NAME,
    OutputPlan,
    PlannedTensor,
    ShardPlan,
    WriteResult,
    copy_file_atomic,
    per_tensor,
    plan_shards,
    producer_pool,
    write_bytes_atomic,
    write_checkpoint,
    write_json_atomic,
)

__all__ = [
    "CONFIG_NAME",
    "DTYPES",
    "INDEX_NAME",
    "JOURNAL_NAME",
    "LOCK_NAME",
    "ROLES",
    "Checkpoint",
    "Layout",
    "LayoutInfo",
    "OutputPlan",
    "PlannedTensor",
    "Problem",
    "ShardHeader",
    "ShardPlan",
    "TensorInfo",
    "ValidationReport",
    "WriteResult",
    "classify_layout",
    "copy_file_atomic",
    "ensure_valid",
    "format_summary",
    "from_torch",
    "locate",
    "per_tensor",
    "plan_shards",
    "producer_pool",
    "read_config",
    "read_header",
    "read_index",
    "read_tensor",
    "require_layout",
    "role_of",
    "summarize",
    "to_torch",
    "validate_checkpoint",
    "write_bytes_atomic",
    "write_checkpoint",
    "write_json_atomic",
]
