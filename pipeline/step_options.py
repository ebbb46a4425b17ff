"""The defaults every streaming step (dequant, convert, slice) shares, in one place: the steps' plan
functions take them as their defaults, and the command line (pipeline/cli/options.py) shows them.
Torch-free, so that `dsv4 --help` can read them."""

from __future__ import annotations

DEFAULT_SHARD_GIB = 5.0
DEFAULT_SHARD_BYTES = int(DEFAULT_SHARD_GIB * 1024**3)  # a size the hub and vLLM's loader handle well
