"""fix_config: check the inputs up front, then run the target's rules over the config."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence

from pipeline.errors import DsV4Error

from .engine import FixContext, FixResult, key_error, run_rules
from .layer_types import check_ratios, expected_ratio_count, ratios_from_layer_types, source_ratios
from .quant_layout import nvfp4_layers
from .rope import yarn_params
from .table import rules_for
from .targets import DEFAULT_TARGET, VLLM_TARGETS


def validate_inputs(config: object, ctx: FixContext) -> None:
    """The checks that must pass before any rewrite; DsV4Error naming file and key."""
    if not isinstance(config, dict):
        raise DsV4Error(f"{ctx.where}: expected a JSON object, got {type(config).__name__}")
    if ctx.target not in VLLM_TARGETS:
        raise DsV4Error(f"target vLLM {ctx.target!r} is not one of {', '.join(VLLM_TARGETS)}")
    if "num_hidden_layers" not in config:
        raise key_error(ctx, "num_hidden_layers", "missing (needed to check the per-layer compress ratios)")
    expected_ratio_count(config, ctx)
    if ctx.source_config is not None:
        if not isinstance(ctx.source_config, dict):
            raise DsV4Error(f"{ctx.source_where}: expected a JSON object")
        for k in ("num_hidden_layers", "num_nextn_predict_layers"):
            if k in ctx.source_config and ctx.source_config.get(k) != config.get(k, ctx.source_config[k]):
                raise key_error(
                    ctx,
                    k,
                    f"{config.get(k)!r} differs from {ctx.source_where}'s "
                    f"{ctx.source_config[k]!r}: not the model this checkpoint came from",
                )
        source_ratios(ctx)
    if "compress_ratios" in config:
        check_ratios(config["compress_ratios"], config, ctx, "compress_ratios")
    elif ratios_from_layer_types(config, ctx) is None and ctx.source_config is None:
        raise key_error(
            ctx,
            "compress_ratios",
            "missing, no layer_types + compress_rates to derive it from, and no --source-config given",
        )
    yarn_params(config, ctx)  # raises when no rope parameters can be found


def fix_config(
    config: dict,
    *,
    target: str = DEFAULT_TARGET,
    source_config: dict | None = None,
    tensor_keys: Sequence[str] | None = None,
    hf_quant_config: dict | None = None,
    where: str = "config.json",
    source_where: str = "source config",
) -> FixResult:
    """Apply the rules for ``target`` to ``config``; the inputs are not modified."""
    ctx = FixContext(
        target=target,
        source_config=copy.deepcopy(source_config),
        tensor_keys=None if tensor_keys is None else tuple(tensor_keys),
        hf_quant_config=copy.deepcopy(hf_quant_config),
        where=where,
        source_where=source_where,
    )
    validate_inputs(config, ctx)
    if ctx.tensor_keys is not None:
        # checked before any rewrite (names the offending tensor), and computed once: 71k experts on V4 Pro
        ctx = dataclasses.replace(ctx, nvfp4_modules=tuple(nvfp4_layers(ctx.tensor_keys, ctx)))
    return run_rules(rules_for(target), config, hf_quant_config, ctx)
