"""One declarative table from every key of every input dialect to its outcome in the release layout.

Three spellings of the same tensors meet here (BRIEF §3):

* **N** — the native release layout (``layers.3.attn.wq_a.weight``), also the layout this pipeline
  writes: the release with each routed expert's MXFP4 ``.weight/.scale`` replaced by ModelOpt NVFP4
  ``.weight/.weight_scale/.weight_scale_2/.input_scale`` (:func:`target_layout`), which vLLM's
  ``DeepseekV4FP8Config`` loads.
* **H** — transformers' module names with per-expert split, as the seeds' ModelOpt 0.45 export wrote
  them (``model.layers.3.self_attn.q_a_proj.weight``, ``model.layers.3.mlp.experts.0.gate_proj.weight``).
* **X** — ModelOpt 0.47 + transformers 5.23: transformers reverses its renames on save, so names are
  native with a ``model.`` prefix, except ``model.embed_tokens``, ``model.hc_head.hc_*``, ``head.weight``
  and the attention ``kv_norm`` that the reversal turns into ``attn.norm``.

Two tables, both data:

* :data:`RULES` — an ordered tuple of :class:`Rule` (name, dialects, regex with named groups, target
  template, reason, example). A key of dialect D is renamed by the one rule of D whose pattern
  fullmatches it (the tests check that no key matches two rules), like vLLM's ``WeightsMapper``
  but one rule per tensor role so every rename carries its reason. A key no rule matches is an
  :class:`UnmappedKeyError` that names the nearest rule: nothing is skipped silently.
* :data:`ACTIONS` — what happens to the bytes, from the source tensor's form (suffix + stored dtype)
  and the target format the release layout gives that weight (``pipeline.release_layout``; routed
  experts become NVFP4). Vocabulary: :data:`ACTION_NAMES`.

:func:`plan` maps a whole checkpoint's (key, dtype, shape) list and checks that it writes every key of
:func:`target_layout` exactly once, naming what is missing, duplicated or mis-shaped.

Modules, each importing only those above it in this list:

rules     the rename table as data: DIALECTS, Rule, RULES, RULES_BY_NAME
target    the target layout: TargetTensor, target_layout, target_tensors, NVFP4 (+ role/suffix lookups)
errors    MappingError, UnmappedKeyError
actions   the action vocabulary and table: ACTION_NAMES, ActionRule, ACTIONS, source_form, decide_action
keys      one key: Mapping, rename, nearest_rule, map_key
dialects  detect_dialect
planning  a whole checkpoint: Lack, EXPORT_LACKS, Plan, plan
docs      rule_table_markdown (docs/mapping.md)

What the rules rest on (read in the installed sources; re-check when versions move):

* transformers 5.23.0 ``conversion_mapping.py`` ``"deepseek_v4"`` (native -> HF renames, reversed on
  save) and ``models/deepseek_v4/modeling_deepseek_v4.py`` (module names; ``mtp.*`` is in
  ``_keys_to_ignore_on_load_unexpected``: there is no MTP module, so H and X exports have no MTP keys).
* A real ModelOpt 0.47.0 + transformers 5.23.0 export of the micro tiny model (fixtures/mapping_x_*.json).
* vLLM 0.32.0 ``_make_deepseek_v4_weights_mapper`` (models/deepseek_v4/{nvidia,cpu}/model.py): it reads
  native names (prefix ``layers.`` -> ``model.layers.``, ``.scale`` -> ``.weight_scale_inv``, ...) and
  drops ``mtp.*`` from the main model; the MTP draft model (``DeepSeekV4MTP``, nvidia/mtp.py) loads
  ``mtp.{i}.*`` itself, so the target keeps them.
"""

from .actions import (
    ACTION_NAMES,
    ACTIONS,
    BF16_TO_FP8,
    BF16_TO_NVFP4,
    BF16_VIA_NVFP4,
    CAST,
    COPY,
    DROP,
    FALLBACK_INPUT_SCALE,
    FP8_REQUANT,
    FP8_VIA_NVFP4,
    GRAFT,
    INPUT_SCALE,
    KEEP_NVFP4,
    NOTHING,
    NVFP4_TO_BF16,
    NVFP4_TO_FP8,
    NVFP4_WEIGHT,
    REQUANTIZE_EXPERT,
    SELF,
    TRANSCODE,
    UNIFY_W13,
    WEIGHT_AND_SCALE,
    ActionRule,
    decide_action,
    source_form,
)
from .dialects import detect_dialect
from .docs import rule_table_markdown
from .errors import MappingError, UnmappedKeyError
from .keys import Mapping, map_key, nearest_rule, rename
from .planning import EXPORT_LACKS, Lack, Plan, _expected_source_shape, plan
from .rules import DIALECTS, RULES, RULES_BY_NAME, Rule
from .target import NVFP4, NVFP4_GROUP, NVFP4_SUFFIXES, TargetTensor, _base, target_layout, target_tensors

__all__ = [
    "ACTIONS",
    "ACTION_NAMES",
    "BF16_TO_FP8",
    "BF16_TO_NVFP4",
    "BF16_VIA_NVFP4",
    "CAST",
    "COPY",
    "DIALECTS",
    "DROP",
    "EXPORT_LACKS",
    "FALLBACK_INPUT_SCALE",
    "FP8_REQUANT",
    "FP8_VIA_NVFP4",
    "GRAFT",
    "INPUT_SCALE",
    "KEEP_NVFP4",
    "NOTHING",
    "NVFP4",
    "NVFP4_GROUP",
    "NVFP4_SUFFIXES",
    "NVFP4_TO_BF16",
    "NVFP4_TO_FP8",
    "NVFP4_WEIGHT",
    "REQUANTIZE_EXPERT",
    "RULES",
    "RULES_BY_NAME",
    "SELF",
    "TRANSCODE",
    "UNIFY_W13",
    "WEIGHT_AND_SCALE",
    "ActionRule",
    "Lack",
    "Mapping",
    "MappingError",
    "Plan",
    "Rule",
    "TargetTensor",
    "UnmappedKeyError",
    "_base",
    "_expected_source_shape",
    "decide_action",
    "detect_dialect",
    "map_key",
    "nearest_rule",
    "plan",
    "rename",
    "rule_table_markdown",
    "source_form",
    "target_layout",
    "target_tensors",
]
