"""compress_ratios (vLLM 0.32's per-layer list) and layer_types + compress_rates (transformers >= 5.8,
vLLM 0.33): restored, derived and checked to agree."""

from __future__ import annotations

from .engine import FixContext, Rule, State, key_error, non_negative_int, short, with_config
from .targets import BOTH

# transformers >= 5.8 layer types -> compress ratio (configuration_deepseek_v4.py,
# _COMPRESS_RATIO_TO_LAYER_TYPE inverted; the rates of the two compressed types come from
# compress_rates, default_compress_rates when absent). Sliding layers have ratio 0.
SLIDING = "sliding_attention"
DEFAULT_COMPRESS_RATES = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
_RATIO_TO_LAYER_TYPE = {0: SLIDING, 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}


def expected_ratio_count(config: dict, ctx: FixContext) -> int:
    """compress_ratios has one entry per layer plus one per MTP (next-n) layer."""
    return non_negative_int(ctx, config, "num_hidden_layers") + non_negative_int(
        ctx, config, "num_nextn_predict_layers", 1
    )


def ratios_from_layer_types(config: dict, ctx: FixContext) -> list[int] | None:
    """compress_ratios as vLLM 0.33's get_compress_ratios derives it; None without layer_types."""
    layer_types = config.get("layer_types")
    if layer_types is None:
        return None
    n = non_negative_int(ctx, config, "num_hidden_layers")
    rates = config.get("compress_rates")
    if rates is None:
        rates = DEFAULT_COMPRESS_RATES
    if not isinstance(rates, dict) or not all(isinstance(v, int) for v in rates.values()):
        raise key_error(ctx, "compress_rates", f"expected an object of layer type -> int, got {rates!r}")
    if not isinstance(layer_types, list) or len(layer_types) != n:
        got = len(layer_types) if isinstance(layer_types, list) else type(layer_types).__name__
        raise key_error(ctx, "layer_types", f"expected a list of num_hidden_layers={n} entries, got {got}")
    ratios = []
    for i, t in enumerate(layer_types):
        if t == SLIDING:
            ratios.append(0)
        elif t in DEFAULT_COMPRESS_RATES:
            ratios.append(int(rates.get(t, DEFAULT_COMPRESS_RATES[t])))
        else:
            raise key_error(ctx, f"layer_types[{i}]", f"unknown layer type {t!r}")
    return ratios + [0] * non_negative_int(ctx, config, "num_nextn_predict_layers", 1)


def check_ratios(ratios: object, config: dict, ctx: FixContext, key: str) -> list[int]:
    want = expected_ratio_count(config, ctx)
    if not isinstance(ratios, list) or not all(
        isinstance(r, int) and not isinstance(r, bool) for r in ratios
    ):
        raise key_error(ctx, key, f"expected a list of ints, got {short(ratios)}")
    if len(ratios) != want:
        raise key_error(
            ctx,
            key,
            f"has {len(ratios)} entries, expected num_hidden_layers + num_nextn_predict_layers = {want} "
            "(one per layer, then the MTP layers)",
        )
    bad = sorted({r for r in ratios if r not in _RATIO_TO_LAYER_TYPE})
    if bad:
        raise key_error(ctx, key, f"ratios {bad} are not among 0, 4, 128 (the V4 layer kinds)")
    return list(ratios)


def source_ratios(ctx: FixContext) -> list[int] | None:
    src = ctx.source_config
    if src is None:
        return None
    sctx = FixContext(target=ctx.target, where=ctx.source_where)
    if "compress_ratios" in src:
        return check_ratios(src["compress_ratios"], src, sctx, "compress_ratios")
    derived = ratios_from_layer_types(src, sctx)
    if derived is None:
        raise key_error(sctx, "compress_ratios", "missing, and no layer_types to derive it from")
    return derived


def _rule_compress_ratios(state: State, ctx: FixContext) -> State:
    config = state.config
    want = source_ratios(ctx)
    have = config.get("compress_ratios")
    if have is not None:
        have = check_ratios(have, config, ctx, "compress_ratios")
        if want is not None and have != want:
            raise key_error(
                ctx,
                "compress_ratios",
                f"{short(have)} differs from {ctx.source_where}'s "
                f"{short(want)}: not the model this checkpoint came from",
            )
        return state
    if want is None:
        want = ratios_from_layer_types(config, ctx)
    if want is None:
        raise key_error(
            ctx,
            "compress_ratios",
            "missing, no layer_types + compress_rates to derive it from, and no --source-config given",
        )
    return with_config(state, {**config, "compress_ratios": want})


def _rule_layer_types_agree(state: State, ctx: FixContext) -> State:
    derived = ratios_from_layer_types(state.config, ctx)
    ratios = state.config.get("compress_ratios")
    if (
        derived is not None
        and ratios is not None
        and derived[: len(derived) - 1] != ratios[: len(derived) - 1]
    ):
        n = non_negative_int(ctx, state.config, "num_hidden_layers")
        first = next(i for i in range(n) if derived[i] != ratios[i])
        raise key_error(
            ctx,
            "layer_types",
            f"layer {first} is {state.config['layer_types'][first]!r} (ratio {derived[first]}) but "
            f"compress_ratios[{first}] is {ratios[first]}; transformers' DeepseekV4Config (vLLM 0.33) "
            "follows layer_types and ignores compress_ratios, so the two must agree",
        )
    return state


RULES: tuple[Rule, ...] = (
    Rule(
        "compress_ratios",
        ("compress_ratios",),
        "transformers >= 5.8 saves layer_types + compress_rates instead (seed config patch 1); vLLM 0.32 "
        "reads config.compress_ratios[layer] and recognises V4 by hasattr(config, 'compress_ratios'). "
        "Restored from --source-config, else derived from layer_types + compress_rates (+ 0 per MTP layer, "
        "as vLLM 0.33's get_compress_ratios does). vLLM 0.33 derives it itself but accepts it.",
        BOTH,
        _rule_compress_ratios,
    ),
    Rule(
        "layer_types_agree",
        ("layer_types", "compress_rates"),
        "vLLM 0.33 uses transformers' DeepseekV4Config, where an explicit layer_types wins over "
        "compress_ratios: if both are present they must describe the same layers (checked, never guessed).",
        ("0.33",),
        _rule_layer_types_agree,
    ),
)
