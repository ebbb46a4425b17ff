"""RoPE: the flat YaRN rope_scaling, rope_theta/compress_rope_theta, rope_parameters dropped, and
qk_rope_head_dim."""

from __future__ import annotations

from typing import Any

from .engine import FixContext, Rule, State, key_error, with_config
from .targets import BOTH

YARN_KEYS = ("beta_fast", "beta_slow", "factor", "original_max_position_embeddings")


def _is_yarn(d: object) -> bool:
    return isinstance(d, dict) and (d.get("rope_type") == "yarn" or d.get("type") == "yarn")


def _nested(d: object) -> bool:
    return isinstance(d, dict) and isinstance(d.get("main"), dict) and isinstance(d.get("compress"), dict)


def yarn_params(config: dict, ctx: FixContext) -> tuple[str, dict]:
    """(where found, flat yarn dict) from rope_scaling or rope_parameters, flat or nested."""
    candidates: list[tuple[str, object]] = []
    for key in ("rope_scaling", "rope_parameters"):
        d = config.get(key)
        if _nested(d):
            # YaRN belongs to the compressed layers (transformers nests it under "compress").
            candidates += [(f"{key}.compress", d["compress"]), (f"{key}.main", d["main"])]
        elif d is not None:
            candidates.append((key, d))
    for where, d in candidates:
        if _is_yarn(d):
            missing = [k for k in YARN_KEYS if k not in d]
            if missing:
                raise key_error(ctx, where, f"yarn parameters lack {', '.join(missing)}")
            return where, {**{k: d[k] for k in YARN_KEYS}, "type": "yarn"}
    looked = ", ".join(w for w, _ in candidates) or "rope_scaling, rope_parameters (both absent)"
    raise key_error(
        ctx,
        "rope_scaling",
        f"no yarn rope parameters found (looked in {looked}); "
        "DeepSeek V4 needs type yarn with factor, original_max_position_embeddings, "
        "beta_fast, beta_slow",
    )


def _rope_theta(config: dict, ctx: FixContext, top: str, sub: str) -> Any:
    if top in config:
        return config[top]
    for key in ("rope_parameters", "rope_scaling"):
        d = config.get(key)
        if _nested(d) and "rope_theta" in d[sub]:
            return d[sub]["rope_theta"]
    raise key_error(
        ctx, top, f"missing, and no {{rope_parameters,rope_scaling}}.{sub}.rope_theta to take it from"
    )


def _rule_rope_scaling(state: State, ctx: FixContext) -> State:
    config = state.config
    rs = config.get("rope_scaling")
    if _is_yarn(rs) and not _nested(rs) and all(k in rs for k in YARN_KEYS):
        flat = rs
    else:
        _, flat = yarn_params(config, ctx)
    new = dict(config)
    new["rope_theta"] = _rope_theta(config, ctx, "rope_theta", "main")
    new["compress_rope_theta"] = _rope_theta(config, ctx, "compress_rope_theta", "compress")
    new["rope_scaling"] = flat
    # rope_theta/compress_rope_theta keep their position when present; added ones go at the end.
    if new == config:
        return state
    return with_config(state, new)


def _rule_drop_rope_parameters(state: State, ctx: FixContext) -> State:
    if "rope_parameters" not in state.config:
        return state
    return with_config(state, {k: v for k, v in state.config.items() if k != "rope_parameters"})


def _rule_qk_rope_head_dim(state: State, ctx: FixContext) -> State:
    config = state.config
    if "qk_rope_head_dim" in config:
        return state
    prf, head = config.get("partial_rotary_factor"), config.get("head_dim")
    if prf is None and ctx.source_config is not None and "qk_rope_head_dim" in ctx.source_config:
        return with_config(state, {**config, "qk_rope_head_dim": ctx.source_config["qk_rope_head_dim"]})
    if not isinstance(prf, (int, float)) or not isinstance(head, int):
        raise key_error(
            ctx, "qk_rope_head_dim", "missing, and no partial_rotary_factor + head_dim to derive it from"
        )
    return with_config(state, {**config, "qk_rope_head_dim": int(head * prf)})


RULES: tuple[Rule, ...] = (
    Rule(
        "rope_scaling",
        ("rope_scaling", "rope_theta", "compress_rope_theta"),
        "transformers >= 5.8 writes nested rope_parameters {main, compress} (seed config patches 3-4); "
        "vLLM 0.32 reads rope_scaling first and needs the flat yarn dict. The yarn values come from the "
        "sub-dict that is yarn ('compress' in transformers 5.23; 'main' there is plain rope), never blindly "
        "from 'main' (the seeds' fix), which would drop YaRN from the compressed layers.",
        BOTH,
        _rule_rope_scaling,
    ),
    Rule(
        "rope_parameters",
        ("rope_parameters",),
        "Dropped once rope_scaling/rope_theta/compress_rope_theta hold it all, as in the release config: "
        "transformers (5.19, 5.23) rebuilds the identical {main, compress} nesting from them, vLLM 0.32 "
        "prefers rope_scaling, and a second copy could only drift. Flattening it to 'main' (the seeds) makes "
        "transformers see rope_type default and lose YaRN on compressed layers.",
        BOTH,
        _rule_drop_rope_parameters,
    ),
    Rule(
        "qk_rope_head_dim",
        ("qk_rope_head_dim",),
        "vLLM's V4 attention, indexer and compressor read config.qk_rope_head_dim; transformers >= 5.8 "
        "may keep only partial_rotary_factor (= qk_rope_head_dim / head_dim).",
        BOTH,
        _rule_qk_rope_head_dim,
    ),
)
