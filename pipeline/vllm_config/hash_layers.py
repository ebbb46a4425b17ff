"""The hash-routed MoE layers: num_hash_layers (vLLM 0.32) and mlp_layer_types (vLLM 0.33)."""

from __future__ import annotations

from .engine import FixContext, Rule, State, key_error, short, with_config

# transformers' DeepseekV4Config.default_num_hash_layers: the hash layers it assumes for a config with
# neither mlp_layer_types nor a legacy num_hash_layers (configuration_deepseek_v4.py, __post_init__)
TRANSFORMERS_DEFAULT_HASH_LAYERS = 3


def _hash_layers(config: dict, ctx: FixContext) -> int | None:
    mlp = config.get("mlp_layer_types")
    if mlp is None:
        return None
    if not isinstance(mlp, list) or any(t not in ("hash_moe", "moe") for t in mlp):
        raise key_error(ctx, "mlp_layer_types", f"expected a list of 'hash_moe'/'moe', got {short(mlp)}")
    n = mlp.count("hash_moe")
    if mlp[:n] != ["hash_moe"] * n:
        raise key_error(
            ctx, "mlp_layer_types", "hash_moe layers must come first (num_hash_layers cannot say otherwise)"
        )
    return n


def _rule_num_hash_layers(state: State, ctx: FixContext) -> State:
    config = state.config
    derived = _hash_layers(config, ctx)
    src = (ctx.source_config or {}).get("num_hash_layers")
    if src is None and ctx.source_config is not None:
        src = _hash_layers(ctx.source_config, FixContext(where=ctx.source_where))
    if "num_hash_layers" in config:
        have = config["num_hash_layers"]
        for other, what in ((derived, "mlp_layer_types"), (src, ctx.source_where)):
            if other is not None and other != have:
                raise key_error(
                    ctx, "num_hash_layers", f"{have!r} disagrees with {what} ({other} hash layers)"
                )
        return state
    value = src if src is not None else derived
    if value is None:
        raise key_error(
            ctx,
            "num_hash_layers",
            "missing, and no mlp_layer_types or --source-config to derive it from "
            + HASH_LAYERS_READER.get(ctx.target, ""),
        )
    return with_config(state, {**config, "num_hash_layers": value})


# what each target does with a config that says nothing about hash layers (the error's last words)
HASH_LAYERS_READER = {
    "0.32": "(vLLM 0.32 reads config.num_hash_layers)",
    "0.33": f"(transformers' DeepseekV4Config, which vLLM 0.33 uses, would silently assume "
    f"{TRANSFORMERS_DEFAULT_HASH_LAYERS} hash layers)",
}


def _rule_hash_layers_known(state: State, ctx: FixContext) -> State:
    """vLLM 0.33: the model counts mlp_layer_types' 'hash_moe'; transformers builds mlp_layer_types from
    a legacy num_hash_layers, else from its default. An mlp_layer_types stays as it is (checked against
    num_hash_layers and the source when they say otherwise); without it, num_hash_layers must be there
    or restorable, as for 0.32."""
    config = state.config
    if "mlp_layer_types" not in config or "num_hash_layers" in config:
        return _rule_num_hash_layers(state, ctx)
    derived = _hash_layers(config, ctx)
    src = (ctx.source_config or {}).get("num_hash_layers")
    if src is None and ctx.source_config is not None:
        src = _hash_layers(ctx.source_config, FixContext(where=ctx.source_where))
    if src is not None and src != derived:
        raise key_error(
            ctx, "mlp_layer_types", f"has {derived} hash_moe layers, {ctx.source_where} has {src}"
        )
    return state


def _rule_drop_mlp_layer_types(state: State, ctx: FixContext) -> State:
    if "mlp_layer_types" not in state.config:
        return state
    return with_config(state, {k: v for k, v in state.config.items() if k != "mlp_layer_types"})


RULES: tuple[Rule, ...] = (
    Rule(
        "num_hash_layers",
        ("num_hash_layers",),
        "transformers >= 5.8 saves mlp_layer_types instead; vLLM 0.32's model reads config.num_hash_layers "
        "(hash-routed MoE layers). Restored from --source-config or the count of 'hash_moe'.",
        ("0.32",),
        _rule_num_hash_layers,
    ),
    Rule(
        "hash_layers_known",
        ("num_hash_layers",),
        "vLLM 0.33's model counts 'hash_moe' in config.mlp_layer_types, which transformers' "
        "DeepseekV4Config builds from a legacy num_hash_layers and, when a config has neither, from its "
        f"default of {TRANSFORMERS_DEFAULT_HASH_LAYERS} hash layers, silently. mlp_layer_types stays as "
        "it is; without it, num_hash_layers is restored from --source-config or the fix is refused.",
        ("0.33",),
        _rule_hash_layers_known,
    ),
    Rule(
        "mlp_layer_types",
        ("mlp_layer_types",),
        "vLLM 0.32's own DeepseekV4Config on transformers 5.19 rejects mlp_layer_types values "
        "'hash_moe'/'moe' (StrictDataclassClassValidationError at config load); num_hash_layers carries "
        "the same information. vLLM 0.33 reads mlp_layer_types, so it stays there.",
        ("0.32",),
        _rule_drop_mlp_layer_types,
    ),
)
