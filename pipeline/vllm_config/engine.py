"""The rule engine: the data a rule sees and returns, the change record, and the loop that runs an
ordered table of rules, checking that each touches only the keys it declares (pure, no I/O)."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import DsV4Error

from .targets import DEFAULT_TARGET

HF_QUANT_CONFIG = "hf_quant_config.json"
_HFQ = HF_QUANT_CONFIG + ":"  # key prefix for changes to hf_quant_config.json


class _Absent:
    """A key that is not in the config (distinct from a JSON null)."""

    def __repr__(self) -> str:
        return "<absent>"


ABSENT: Any = _Absent()


@dataclass(frozen=True)
class Change:
    rule: str
    key: str  # dotted path in config.json; "hf_quant_config.json:<path>" for that file
    before: Any
    after: Any
    reason: str

    def to_json(self) -> dict[str, Any]:
        def enc(v: Any) -> Any:
            return "<absent>" if v is ABSENT else v

        return {
            "rule": self.rule,
            "key": self.key,
            "before": enc(self.before),
            "after": enc(self.after),
            "reason": self.reason,
        }

    def describe(self) -> str:
        return (
            f"[{self.rule}] {self.key}: {short(self.before)} -> {short(self.after)}\n    why: {self.reason}"
        )


@dataclass(frozen=True)
class FixContext:
    """What the rules may consult besides the config (all optional)."""

    target: str = DEFAULT_TARGET
    source_config: dict | None = None  # the release/BF16 config the checkpoint came from
    tensor_keys: tuple[str, ...] | None = None  # every tensor key of the checkpoint (None: unknown)
    hf_quant_config: dict | None = None  # the checkpoint's current hf_quant_config.json, if any
    where: str = "config.json"  # names the file in error messages
    source_where: str = "source config"
    nvfp4_modules: tuple[str, ...] | None = None  # nvfp4_layers(tensor_keys), computed once by fix_config


@dataclass
class State:
    config: dict
    hf_quant_config: dict | None


@dataclass(frozen=True)
class Rule:
    name: str
    keys: tuple[str, ...]  # dotted paths it may touch ("hf_quant_config.json" for that file)
    reason: str  # the seed failure / vLLM behaviour it addresses
    versions: tuple[str, ...]  # vLLM versions it applies to
    apply: Callable[[State, FixContext], State] = field(repr=False)


@dataclass(frozen=True)
class FixResult:
    config: dict
    hf_quant_config: dict | None
    changes: tuple[Change, ...]

    @property
    def changed(self) -> bool:
        return bool(self.changes)


# ---- helpers ----------------------------------------------------------------------------------


def short(v: Any, limit: int = 100) -> str:
    if v is ABSENT:
        return "<absent>"
    if isinstance(v, list) and len(v) > 8:
        head = json.dumps(v[:4])[:-1]
        return f"{head}, ... ({len(v)} items)]"
    if isinstance(v, dict) and len(v) > 8:
        first = ", ".join(json.dumps(k) for k in list(v)[:3])
        return f"{{{first}, ... ({len(v)} keys)}}"
    s = json.dumps(v)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def get_key(state: State, key: str) -> Any:
    if key.startswith(HF_QUANT_CONFIG):
        node: Any = state.hf_quant_config
        if node is None:
            return ABSENT
        path = key[len(_HFQ) :].split(".") if key != HF_QUANT_CONFIG else []
    else:
        node = state.config
        path = key.split(".")
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return ABSENT
        node = node[part]
    return node


def key_error(ctx: FixContext, key: str, msg: str) -> DsV4Error:
    return DsV4Error(f"{ctx.where}: key {key}: {msg}")


def non_negative_int(ctx: FixContext, config: dict, key: str, default: int | None = None) -> int:
    v = config.get(key, default)
    if v is None:
        raise key_error(ctx, key, "missing (needed to size the per-layer lists)")
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise key_error(ctx, key, f"expected a non-negative integer, got {v!r}")
    return v


def with_config(state: State, config: dict) -> State:
    return State(config=config, hf_quant_config=state.hf_quant_config)


def _top(key: str) -> str:
    return HF_QUANT_CONFIG if key.startswith(HF_QUANT_CONFIG) else key.split(".")[0]


def run_rules(
    rules: Sequence[Rule], config: dict, hf_quant_config: dict | None, ctx: FixContext
) -> FixResult:
    """Apply ``rules`` in order to copies of ``config`` and ``hf_quant_config``; every change, with its
    rule's reason. A rule that changes a key it does not declare is a bug in the table (AssertionError)."""
    state = State(config=copy.deepcopy(config), hf_quant_config=copy.deepcopy(hf_quant_config))
    changes: list[Change] = []
    for rule in rules:
        declared = {_top(k) for k in rule.keys}
        # Each rule gets its own copy of what it may change; hf_quant_config (71k entries on V4 Pro) is
        # copied only for the rules that declare it, and the others must hand back the same object.
        hfq_in = (
            copy.deepcopy(state.hf_quant_config) if HF_QUANT_CONFIG in declared else state.hf_quant_config
        )
        new = rule.apply(State(copy.deepcopy(state.config), hfq_in), ctx)
        stray = [
            k
            for k in set(state.config) | set(new.config)
            if k not in declared and state.config.get(k, ABSENT) != new.config.get(k, ABSENT)
        ]
        if stray or (HF_QUANT_CONFIG not in declared and new.hf_quant_config is not state.hf_quant_config):
            raise AssertionError(f"rule {rule.name} changed undeclared keys {stray}")  # a bug in the table
        for key in rule.keys:
            before, after = get_key(state, key), get_key(new, key)
            if before != after or (before is ABSENT) != (after is ABSENT):
                changes.append(Change(rule.name, key, before, after, rule.reason))
        state = new
    return FixResult(config=state.config, hf_quant_config=state.hf_quant_config, changes=tuple(changes))


def dumps(obj: object) -> str:
    """The bytes fix-config writes (as pipeline.checkpoint.atomic.write_json_atomic does)."""
    return json.dumps(obj, indent=2) + "\n"
