"""The vLLM versions a config can be fixed for. Torch-free and import-free: the command line's
--target-vllm reads it for its choices and default."""

from __future__ import annotations

VLLM_TARGETS: tuple[str, ...] = ("0.32", "0.33")
DEFAULT_TARGET = "0.33"
BOTH = ("0.32", "0.33")
LAYOUT_TARGET = "0.32"  # the one of VLLM_TARGETS whose rules restore compress_ratios and num_hash_layers
