"""Amax files for ``dsv4 convert RELEASE --amax AMAX``: read ours or NVIDIA's, resolve every entry to a
release module, apply the rules an export would have applied. Rules layer: no step, no writing.

names  the one table from quantizer names (ModelOpt on transformers; NVIDIA's ptq.py) to release modules
read   the two file formats -> entries (file, key, value), every problem naming file and key
table  the resolved table (release module -> weight amax, input amax) and its rules, with reasons
"""

from __future__ import annotations

from .names import FUSED_EXPERT_PARAMS, INPUT, SPELLINGS, WEIGHT, QuantizerNameError, resolve_name
from .read import DSV4, NVIDIA, AmaxFile, Entry, read_amax
from .table import FALLBACK, SHARE_RULES, AmaxTable, ModuleAmax, Value, build_table, load_table

__all__ = [
    "DSV4",
    "FALLBACK",
    "FUSED_EXPERT_PARAMS",
    "INPUT",
    "NVIDIA",
    "SHARE_RULES",
    "SPELLINGS",
    "WEIGHT",
    "AmaxFile",
    "AmaxTable",
    "Entry",
    "ModuleAmax",
    "QuantizerNameError",
    "Value",
    "build_table",
    "load_table",
    "read_amax",
    "resolve_name",
]
