"""The quantization layout: the mixed FP8 + NVFP4 quantization_config vLLM's DeepseekV4FP8Config loads,
hf_quant_config.json listing the NVFP4 routed experts by native name, and scale_fmt."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

from pipeline.errors import DsV4Error
from pipeline.release_layout import ROUTED_EXPERT, SCALE_SUFFIX

from .engine import HF_QUANT_CONFIG, FixContext, Rule, State, key_error, with_config
from .targets import BOTH

# The quantization_config of the mixed layout (FP8 block linears + ModelOpt NVFP4 routed experts)
# that DeepseekV4FP8Config loads; the NVIDIA-published DeepSeek-V4-Pro-NVFP4 layout (BRIEF §4).
MIXED_QUANT_CONFIG: dict[str, Any] = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "scale_fmt": "ue8m0",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
    "moe_quant_algo": "NVFP4",
    "expert_dtype": "fp4",
}
NVFP4_GROUP_SIZE = 16
NVFP4_MARKER = ".weight_scale_2"  # ModelOpt NVFP4: weight, weight_scale, weight_scale_2, input_scale
# Routed experts in the native layout; the only modules DeepseekV4FP8Config builds as NVFP4.


def nvfp4_layers(keys: Iterable[str], ctx: FixContext) -> list[str]:
    """Module names of the NVFP4 weights (those with a weight_scale_2), checked to be native routed experts.

    DeepseekV4FP8Config builds only routed experts as NVFP4 (ModelOptNvFp4FusedMoE); an NVFP4 weight
    anywhere else (attention, shared experts, compressor: the full ModelOpt recipe) or under another
    dialect's name (``model.layers.N.mlp.experts...``) cannot load in the mixed layout.
    """
    keys = set(keys)
    layers = sorted(k[: -len(NVFP4_MARKER)] for k in keys if k.endswith(NVFP4_MARKER))
    not_experts = [m for m in layers if not ROUTED_EXPERT.match(m)]
    if not_experts:
        raise DsV4Error(
            f"{ctx.where}: tensor {not_experts[0]}{NVFP4_MARKER} (and {len(not_experts) - 1} more) is NVFP4 "
            "but not a routed expert in the native layout (layers.N.ffn.experts.E.w1/w2/w3); vLLM's mixed "
            "FP8 + NVFP4 layout quantizes only routed experts: convert the checkpoint to the native layout "
            "with an experts-only recipe first"
        )
    for m in layers:
        for suffix in (".weight", ".weight_scale", ".input_scale"):
            if m + suffix not in keys:
                raise DsV4Error(f"{ctx.where}: NVFP4 module {m} has a weight_scale_2 but no {m}{suffix}")
    if layers:
        left = sorted(
            k for k in keys if k.endswith(SCALE_SUFFIX) and ROUTED_EXPERT.match(k[: -len(SCALE_SUFFIX)])
        )
        if left:
            raise DsV4Error(
                f"{ctx.where}: tensor {left[0]} (and {len(left) - 1} more) is an MXFP4 expert scale next to "
                "NVFP4 experts; vLLM uses one expert method per model: the conversion is incomplete"
            )
    return sorted(layers, key=_layer_sort_key)


def _layer_sort_key(name: str) -> tuple:
    m = ROUTED_EXPERT.match(name)
    assert m is not None
    return (m["kind"] != "layers", int(m["n"]), int(m["e"]), m["w"])


def _kv_cache_quant_algo(state: State) -> str | None:
    old = (state.hf_quant_config or {}).get("quantization") or {}
    if "kv_cache_quant_algo" in old:
        return old["kv_cache_quant_algo"]
    scheme = (state.config.get("quantization_config") or {}).get("kv_cache_scheme")
    if isinstance(scheme, dict) and scheme.get("type") == "float" and scheme.get("num_bits") == 8:
        return "FP8"
    if isinstance(scheme, str):
        return scheme
    return None


def _producer(state: State) -> dict:
    for src in (state.hf_quant_config or {}, state.config.get("quantization_config") or {}):
        p = src.get("producer")
        if isinstance(p, dict) and p.get("name") == "modelopt":
            return dict(p)
    return {"name": "modelopt", "version": "unknown"}


def _rule_quant_layout(state: State, ctx: FixContext) -> State:
    qc = state.config.get("quantization_config")
    is_modelopt = isinstance(qc, dict) and str(qc.get("quant_method", "")).lower().startswith("modelopt")
    if ctx.tensor_keys is None:
        if is_modelopt:
            raise key_error(
                ctx,
                "quantization_config",
                "is ModelOpt's; the checkpoint's tensor list (model.safetensors.index.json) is "
                "needed to write the mixed layout",
            )
        return state
    layers = ctx.nvfp4_modules if ctx.nvfp4_modules is not None else nvfp4_layers(ctx.tensor_keys, ctx)
    if not layers:
        if is_modelopt:
            raise key_error(
                ctx,
                "quantization_config",
                "says ModelOpt but no tensor has a weight_scale_2 "
                "(no NVFP4 weights): wrong config for these weights",
            )
        return state  # release (FP8 + MXFP4) or BF16 checkpoint: its quantization_config is right
    config = dict(state.config)
    config["quantization_config"] = copy.deepcopy(MIXED_QUANT_CONFIG)
    hfq = {
        "producer": _producer(state),
        "quantization": {
            "quant_algo": "MIXED_PRECISION",
            "kv_cache_quant_algo": _kv_cache_quant_algo(state),
            "quantized_layers": {m: {"quant_algo": "NVFP4", "group_size": NVFP4_GROUP_SIZE} for m in layers},
        },
    }
    return State(config=config, hf_quant_config=hfq)


def _rule_scale_fmt(state: State, ctx: FixContext) -> State:
    qc = state.config.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "fp8" or qc.get("scale_fmt") == "ue8m0":
        return state
    config = dict(state.config)
    config["quantization_config"] = {**qc, "scale_fmt": "ue8m0"}
    return with_config(state, config)


RULES: tuple[Rule, ...] = (
    Rule(
        "quant_layout",
        ("quantization_config", HF_QUANT_CONFIG),
        "ModelOpt exports quant_method 'modelopt' (NVFP4 everywhere), which vLLM's modelopt override builds "
        "as NVFP4 linears the V4 model cannot load (seeds S1-S15); the mixed layout needs quant_method fp8 "
        "+ moe_quant_algo NVFP4 (DeepseekV4FP8Config -> ModelOptNvFp4FusedMoE for routed experts, FP8 block "
        "elsewhere); hf_quant_config.json lists the NVFP4 experts by native name (MIXED_PRECISION). Only "
        "when the checkpoint has NVFP4 (weight_scale_2) tensors.",
        BOTH,
        _rule_quant_layout,
    ),
    Rule(
        "scale_fmt",
        ("quantization_config.scale_fmt",),
        "ModelOpt never exports scale_fmt (seed config patch 2); vLLM's get_config reads "
        "quantization_config.scale_fmt == 'ue8m0' to enable UE8M0 scales in DeepGEMM's FP8 GEMMs, and the "
        "release's FP8 block scales are UE8M0. Only for quant_method fp8.",
        BOTH,
        _rule_scale_fmt,
    ),
)
