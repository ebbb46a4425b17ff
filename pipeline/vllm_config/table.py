"""The ordered rule table and the rules that apply to one vLLM target."""

from __future__ import annotations

from pipeline.errors import DsV4Error

from . import hash_layers, layer_types, quant_layout, rope
from .engine import Rule
from .targets import VLLM_TARGETS

RULES: tuple[Rule, ...] = (*quant_layout.RULES, *layer_types.RULES, *hash_layers.RULES, *rope.RULES)


def rules_for(target: str) -> tuple[Rule, ...]:
    if target not in VLLM_TARGETS:
        raise DsV4Error(f"target vLLM {target!r} is not one of {', '.join(VLLM_TARGETS)}")
    return tuple(r for r in RULES if target in r.versions)
