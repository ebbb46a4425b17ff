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

from __future__ import annotations

import difflib
import functools
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from collections.abc import Mapping as MappingABC
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import DsV4Error, one_line
from pipeline.release_layout import FP8, MXFP4, PLAIN, TensorSpec, release_weights, scale_key

DIALECTS: dict[str, str] = {
    "N": "native release layout (DeepSeek-V4-Pro on the hub; the layout this pipeline writes)",
    "H": "transformers module names, experts split per expert (the seeds' ModelOpt 0.45 export)",
    "X": "ModelOpt 0.47 + transformers 5.23 export: native names under model., a few exceptions",
}

# ---- target layout ------------------------------------------------------------------------------

NVFP4 = "nvfp4"  # the target format of routed experts (ModelOpt NVFP4, 16-element blocks)
NVFP4_GROUP = 16
# ModelOpt NVFP4 siblings of X.weight, stored dtype and shape rule (checked on the real 0.47 export:
# weight_scale_2 and input_scale are 0-d float32).
NVFP4_SUFFIXES = (".weight", ".weight_scale", ".weight_scale_2", ".input_scale")


@dataclass(frozen=True)
class TargetTensor:
    key: str
    dtype: str
    shape: tuple[int, ...]
    fmt: str  # FP8, NVFP4 or PLAIN (release_layout's names)
    weight: str  # the logical weight it belongs to (release_layout's WeightSpec.name)


def _target_specs(weight: Any) -> list[TargetTensor]:
    if weight.fmt == MXFP4:
        rows, cols = weight.shape
        w = weight.name
        return [
            TargetTensor(f"{w}.weight", "U8", (rows, cols // 2), NVFP4, w),
            TargetTensor(f"{w}.weight_scale", "F8_E4M3", (rows, cols // NVFP4_GROUP), NVFP4, w),
            TargetTensor(f"{w}.weight_scale_2", "F32", (), NVFP4, w),
            TargetTensor(f"{w}.input_scale", "F32", (), NVFP4, w),
        ]
    return [TargetTensor(t.key, t.dtype, t.shape, weight.fmt, weight.name) for t in weight.tensors()]


def target_layout(config: MappingABC) -> dict[str, TargetTensor]:
    """Every tensor of the converted checkpoint: the release layout of ``config`` with each MXFP4 routed
    expert as ModelOpt NVFP4 (BRIEF §4: the layout NVIDIA publishes as DeepSeek-V4-Pro-NVFP4)."""
    return {t.key: t for w in release_weights(config) for t in _target_specs(w)}


def target_tensors(config: MappingABC) -> list[TensorSpec]:
    """:func:`target_layout` as release_layout TensorSpecs, in the release's order."""
    return [TensorSpec(t.key, t.dtype, t.shape) for t in target_layout(config).values()]


# Which blocks exist is all that decides a role's format; the sizes of this probe are irrelevant. One
# layer of each kind (hash-routed HCA, CSA with indexer, sliding) plus one MTP block.
_ROLE_PROBE_CONFIG: dict[str, Any] = {
    "hidden_size": 256,
    "vocab_size": 8,
    "hc_mult": 1,
    "num_attention_heads": 1,
    "head_dim": 32,
    "q_lora_rank": 32,
    "o_groups": 1,
    "o_lora_rank": 32,
    "n_routed_experts": 1,
    "moe_intermediate_size": 32,
    "n_shared_experts": 1,
    "num_experts_per_tok": 1,
    "index_n_heads": 1,
    "index_head_dim": 32,
    "num_hidden_layers": 3,
    "num_hash_layers": 1,
    "num_nextn_predict_layers": 1,
    "compress_ratios": [128, 4, 0, 0],
}
_DIGITS = re.compile(r"(?<=\.)\d+(?=\.)")


def _role(key: str) -> str:
    """A key with its layer/expert/MTP indices replaced by '#': its role."""
    return _DIGITS.sub("#", key)


@functools.cache
def _role_layout() -> dict[str, TargetTensor]:
    return {_role(k): t for k, t in target_layout(_ROLE_PROBE_CONFIG).items()}


# ---- rename rules ------------------------------------------------------------------------------

# Suffixes of a linear's tensors in any dialect: the weight, the release's FP8/MXFP4 scale, and
# ModelOpt NVFP4's block scale, global scale and activation scale.
_LIN = r"(?P<s>\.weight|\.scale|\.weight_scale|\.weight_scale_2|\.input_scale)"
_HB = r"model\.layers\.(?P<n>\d+)"  # an H/X decoder layer
_L = "layers.{n}"


@dataclass(frozen=True)
class Rule:
    name: str
    dialects: tuple[str, ...]
    pattern: str  # fullmatched against the key; named groups feed the target template
    target: str  # str.format template over the named groups: the native (dialect N) key
    reason: str
    example: str  # a key the rule maps (checked by the tests; used to name the nearest rule)

    @functools.cached_property
    def regex(self) -> re.Pattern[str]:
        return re.compile(self.pattern)

    def apply(self, key: str) -> str | None:
        m = self.regex.fullmatch(key)
        return None if m is None else self.target.format(**m.groupdict())


_S1 = "seeds S1 (UnboundLocalError: name_mapped): per-expert names did not match vLLM's w1/w2/w3"
_S4 = "S4: KeyError 'layers.0.mlp.experts.0.w2.weight' — transformers says mlp, the release says ffn"
_ATT = "transformers' self_attn is the release's attn (seeds' self_attn->attn fix; S12 removed .mla_attn)"


def _h_attn(hf: str, native: str, what: str) -> Rule:
    return Rule(
        f"h.attn.{hf}",
        ("H",),
        rf"{_HB}\.self_attn\.{hf}{_LIN}",
        f"{_L}.attn.{native}{{s}}",
        f"{what}: transformers' {hf} is the release's {native}; {_ATT}.",
        f"model.layers.0.self_attn.{hf}.weight",
    )


def _h_compressor(hf: str, native: str, indexer: bool, why: str) -> Rule:
    hpath = "compressor.indexer" if indexer else "compressor"
    npath = "indexer.compressor" if indexer else "compressor"
    suffix = _LIN if hf.endswith("_proj") else ("(?P<s>\\.weight)" if hf == "kv_norm" else "(?P<s>)")
    return Rule(
        f"h.{npath}.{hf}",
        ("H",),
        rf"{_HB}\.self_attn\.{hpath}\.{hf}{suffix}",
        f"{_L}.attn.{npath}.{native}{{s}}",
        why
        + (
            " transformers nests the indexer's compressor as self_attn.compressor.indexer "
            "(conversion_mapping: .indexer.compressor. -> .compressor.indexer.)."
            if indexer
            else ""
        ),
        f"model.layers.1.self_attn.{hpath}.{hf}" + (".weight" if suffix != "(?P<s>)" else ""),
    )


def _h_ffn(kind: str, hf: str, native: str, why: str) -> Rule:
    sub = r"experts\.(?P<e>\d+)" if kind == "expert" else "shared_experts"
    nsub = "experts.{e}" if kind == "expert" else "shared_experts"
    ex = "experts.0" if kind == "expert" else "shared_experts"
    return Rule(
        f"h.{kind}.{hf}",
        ("H",),
        rf"{_HB}\.mlp\.{sub}\.{hf}{_LIN}",
        f"{_L}.ffn.{nsub}.{native}{{s}}",
        why,
        f"model.layers.0.mlp.{ex}.{hf}.weight",
    )


_COMP_KV = (
    "Compressor projections: transformers' kv_proj/gate_proj are the release's wkv/wgate (seeds' "
    "compressor fix); vLLM fuses them into compressor.fused_wkv_wgate."
)
_COMP_NORM = (
    "The compressor's own RMSNorm: transformers' compressor.kv_norm is the release's compressor.norm "
    "(conversion_mapping: .norm. -> .kv_norm.). The seeds (S9) moved it onto attn.kv_norm instead: "
    "same [head_dim] shape, so it silently overwrote the attention's kv_norm."
)
_COMP_APE = (
    "transformers' position_bias is the release's ape (learned absolute position bias of the "
    "compression window). The seeds (S10) skipped it as 'unknown', dropping a trained weight."
)

RULES: tuple[Rule, ...] = (
    # -- N: the release's own names (also the NVFP4 layout this pipeline writes) ------------------
    Rule(
        "n.top",
        ("N",),
        r"(?P<k>embed\.weight|head\.weight|norm\.weight|hc_head_(?:fn|base|scale))",
        "{k}",
        "Native top-level tensor: already the release's name.",
        "embed.weight",
    ),
    Rule(
        "n.block",
        ("N",),
        r"(?P<k>layers\.\d+\..+)",
        "{k}",
        "Native decoder-layer tensor: already the release's name (the target layout decides whether "
        "it exists).",
        "layers.0.attn.wq_a.weight",
    ),
    Rule(
        "n.mtp",
        ("N",),
        r"(?P<k>mtp\.\d+\..+)",
        "{k}",
        "Native MTP block: kept. vLLM's main-model mapper drops mtp.*, but its MTP draft model "
        "(DeepSeekV4MTP) loads mtp.{i}.* for speculative decoding.",
        "mtp.0.e_proj.weight",
    ),
    # -- top level, H and X -----------------------------------------------------------------------
    Rule(
        "hx.embed",
        ("H", "X"),
        r"model\.embed_tokens\.weight",
        "embed.weight",
        "transformers names the embedding model.embed_tokens (conversion_mapping: ^embed.weight -> "
        "embed_tokens.weight, under the model. prefix); the 0.47 export's reversal keeps that name.",
        "model.embed_tokens.weight",
    ),
    Rule(
        "h.lm_head",
        ("H",),
        r"lm_head\.weight",
        "head.weight",
        "transformers' lm_head is the release's head (seeds' head naming; vLLM maps head.weight -> "
        "lm_head.weight itself, so a checkpoint holding lm_head.weight would be renamed twice: S12).",
        "lm_head.weight",
    ),
    Rule(
        "x.head",
        ("X",),
        r"head\.weight",
        "head.weight",
        "The 0.47 export's reversal writes the release's head.weight, without the model. prefix.",
        "head.weight",
    ),
    Rule(
        "hx.norm",
        ("H", "X"),
        r"model\.norm\.weight",
        "norm.weight",
        "Final RMSNorm under the model. prefix.",
        "model.norm.weight",
    ),
    Rule(
        "hx.hc_head",
        ("H", "X"),
        r"model\.hc_head\.hc_(?P<p>fn|base|scale)",
        "hc_head_{p}",
        "transformers' hyper-connection head module (conversion_mapping: ^hc_head_fn -> hc_head.hc_fn); "
        "the 0.47 export keeps the module name.",
        "model.hc_head.hc_fn",
    ),
    # -- X: native names under model. ------------------------------------------------------------
    Rule(
        "x.attn.kv_norm",
        ("X",),
        rf"{_HB}\.attn\.norm\.weight",
        f"{_L}.attn.kv_norm.weight",
        "transformers 5.23 reverses .norm. -> .kv_norm. on save, which also turns the attention's own "
        "kv_norm into attn.norm (vLLM: KeyError 'layers.0.attn.norm.weight').",
        "model.layers.0.attn.norm.weight",
    ),
    Rule(
        "x.mtp.attn.kv_norm",
        ("X",),
        r"mtp\.(?P<n>\d+)\.attn\.norm\.weight",
        "mtp.{n}.attn.kv_norm.weight",
        "The export's .kv_norm. -> .norm. reversal reaches the MTP block hf_ptq re-attaches too (seen on a "
        "GPU run: mtp.0.attn.norm.weight), as it does the layers' attention kv_norm (x.attn.kv_norm).",
        "mtp.0.attn.norm.weight",
    ),
    Rule(
        "x.mtp",
        ("X",),
        r"(?P<k>mtp\.\d+\.(?!attn\.norm\.weight$).+)",
        "{k}",
        "ModelOpt's examples/hf_ptq (0.47 era) re-attaches the MTP block, which transformers' model lacks, "
        "from the source checkpoint (example_utils.load_mtp_weights) under the checkpoint's own native "
        "names, excluded from quantization: BF16 from a `dsv4 dequant` source (seen on a GPU run).",
        "mtp.0.e_proj.weight",
    ),
    Rule(
        "x.block",
        ("X",),
        r"model\.(?P<k>layers\.\d+\.(?!attn\.norm\.weight$).+)",
        "{k}",
        "ModelOpt 0.47 with transformers 5.23 writes native layer names under the model. prefix "
        "(transformers reverses its conversion mapping on save).",
        "model.layers.0.attn.wq_a.weight",
    ),
    # -- H: attention ------------------------------------------------------------------------------
    _h_attn("q_a_proj", "wq_a", "Query down-projection (vLLM fuses it with wkv into fused_wqa_wkv)"),
    _h_attn("q_b_proj", "wq_b", "Query up-projection"),
    _h_attn("kv_proj", "wkv", "Shared key/value projection (fused with wq_a in vLLM)"),
    _h_attn("o_a_proj", "wo_a", "Grouped output projection (vLLM reads it as FP8 directly, S13.5/S15)"),
    _h_attn("o_b_proj", "wo_b", "Output projection"),
    Rule(
        "h.attn.q_a_norm",
        ("H",),
        rf"{_HB}\.self_attn\.q_a_norm\.weight",
        f"{_L}.attn.q_norm.weight",
        f"transformers' q_a_norm is the release's q_norm; {_ATT}.",
        "model.layers.0.self_attn.q_a_norm.weight",
    ),
    Rule(
        "h.attn.kv_norm",
        ("H",),
        rf"{_HB}\.self_attn\.kv_norm\.weight",
        f"{_L}.attn.kv_norm.weight",
        f"The attention's kv_norm (not the compressor's, see h.compressor.kv_norm); {_ATT}.",
        "model.layers.0.self_attn.kv_norm.weight",
    ),
    Rule(
        "h.attn.sinks",
        ("H",),
        rf"{_HB}\.self_attn\.sinks",
        f"{_L}.attn.attn_sink",
        f"transformers' sinks is the release's attn_sink; {_ATT}.",
        "model.layers.0.self_attn.sinks",
    ),
    _h_compressor("kv_proj", "wkv", False, _COMP_KV),
    _h_compressor("gate_proj", "wgate", False, _COMP_KV),
    _h_compressor("kv_norm", "norm", False, _COMP_NORM),
    _h_compressor("position_bias", "ape", False, _COMP_APE),
    _h_compressor("kv_proj", "wkv", True, _COMP_KV),
    _h_compressor("gate_proj", "wgate", True, _COMP_KV),
    _h_compressor("kv_norm", "norm", True, _COMP_NORM),
    _h_compressor("position_bias", "ape", True, _COMP_APE),
    Rule(
        "h.indexer.q_b_proj",
        ("H",),
        rf"{_HB}\.self_attn\.compressor\.indexer\.q_b_proj{_LIN}",
        f"{_L}.attn.indexer.wq_b{{s}}",
        "The indexer's query projection: transformers' compressor.indexer.q_b_proj is the release's "
        "attn.indexer.wq_b (conversion_mapping: .indexer.wq_b. -> .compressor.indexer.q_b_proj.).",
        "model.layers.1.self_attn.compressor.indexer.q_b_proj.weight",
    ),
    Rule(
        "h.indexer.weights_proj",
        ("H",),
        rf"{_HB}\.self_attn\.compressor\.indexer\.scorer\.weights_proj{_LIN}",
        f"{_L}.attn.indexer.weights_proj{{s}}",
        "The indexer's head weights: transformers' compressor.indexer.scorer.weights_proj is the "
        "release's attn.indexer.weights_proj.",
        "model.layers.1.self_attn.compressor.indexer.scorer.weights_proj.weight",
    ),
    # -- H: feed-forward ---------------------------------------------------------------------------
    _h_ffn("expert", "gate_proj", "w1", f"Routed expert gate projection: gate_proj -> w1 ({_S1}); {_S4}."),
    _h_ffn("expert", "up_proj", "w3", f"Routed expert up projection: up_proj -> w3 ({_S1}); {_S4}."),
    _h_ffn("expert", "down_proj", "w2", f"Routed expert down projection: down_proj -> w2 ({_S1}); {_S4}."),
    _h_ffn(
        "shared",
        "gate_proj",
        "w1",
        f"Shared expert gate_proj -> w1 (vLLM fuses w1+w3 into gate_up_proj); {_S4}.",
    ),
    _h_ffn("shared", "up_proj", "w3", f"Shared expert up_proj -> w3; {_S4}."),
    _h_ffn("shared", "down_proj", "w2", f"Shared expert down_proj -> w2; {_S4}."),
    Rule(
        "h.router.weight",
        ("H",),
        rf"{_HB}\.mlp\.gate\.weight",
        f"{_L}.ffn.gate.weight",
        f"Router weight; {_S4}.",
        "model.layers.0.mlp.gate.weight",
    ),
    Rule(
        "h.router.bias",
        ("H",),
        rf"{_HB}\.mlp\.gate\.e_score_correction_bias",
        f"{_L}.ffn.gate.bias",
        "transformers' e_score_correction_bias is the release's ffn.gate.bias (vLLM renames "
        ".ffn.gate.bias -> .e_score_correction_bias itself).",
        "model.layers.3.mlp.gate.e_score_correction_bias",
    ),
    Rule(
        "h.router.tid2eid",
        ("H",),
        rf"{_HB}\.mlp\.gate\.tid2eid",
        f"{_L}.ffn.gate.tid2eid",
        f"Hash-routing table of the hash layers; {_S4}.",
        "model.layers.0.mlp.gate.tid2eid",
    ),
    # -- H: norms and hyper-connections ----------------------------------------------------------
    Rule(
        "h.input_layernorm",
        ("H",),
        rf"{_HB}\.input_layernorm\.weight",
        f"{_L}.attn_norm.weight",
        "transformers' input_layernorm is the release's attn_norm.",
        "model.layers.0.input_layernorm.weight",
    ),
    Rule(
        "h.post_attention_layernorm",
        ("H",),
        rf"{_HB}\.post_attention_layernorm\.weight",
        f"{_L}.ffn_norm.weight",
        "transformers' post_attention_layernorm is the release's ffn_norm.",
        "model.layers.0.post_attention_layernorm.weight",
    ),
    Rule(
        "h.hc",
        ("H",),
        rf"{_HB}\.(?P<site>attn|ffn)_hc\.(?P<p>fn|base|scale)",
        _L + ".hc_{site}_{p}",
        "transformers' attn_hc/ffn_hc modules are the release's hc_attn_*/hc_ffn_* parameters.",
        "model.layers.0.attn_hc.fn",
    ),
)

RULES_BY_NAME: dict[str, Rule] = {r.name: r for r in RULES}
if len(RULES_BY_NAME) != len(RULES):  # pragma: no cover - a bug in the table
    raise AssertionError("duplicate rule names in pipeline.mapping.RULES")


# ---- actions ------------------------------------------------------------------------------------

COPY = "copy"
KEEP_NVFP4 = "keep-nvfp4"
NVFP4_TO_FP8 = "nvfp4->fp8-block"
NVFP4_TO_BF16 = "nvfp4->bf16"
BF16_TO_FP8 = "bf16->fp8-block"
CAST = "cast"
UNIFY_W13 = "unify-w13-global-scale"
DROP = "drop"
# Source choices of `dsv4 convert` beyond the export's own tensors (not decided by a source form, so not
# rows of ACTIONS): the release checkpoint given by --graft-from supplies them.
GRAFT = "graft"
TRANSCODE = "mxfp4->nvfp4-transcode"
FALLBACK_INPUT_SCALE = "fallback-input-scale"
BF16_TO_NVFP4 = "bf16->nvfp4"
ACTION_NAMES: dict[str, str] = {
    COPY: "bytes as they are",
    KEEP_NVFP4: "routed-expert NVFP4 tensor kept as exported",
    NVFP4_TO_FP8: "dequantize NVFP4, requantize to FP8 128x128 tiles with UE8M0 scales",
    NVFP4_TO_BF16: "dequantize NVFP4 to BF16",
    BF16_TO_FP8: "quantize a float weight to FP8 128x128 tiles with UE8M0 scales",
    CAST: "cast to the dtype the release stores (e.g. F32 norm -> BF16)",
    UNIFY_W13: "give expert w1 and w3 one weight_scale_2 (vLLM keeps w1's for the fused w13)",
    DROP: "not written; the reason says why",
    BF16_TO_NVFP4: "quantize a float routed expert to NVFP4 by ModelOpt's rule (w1 and w3 sharing one global "
    "scale), for the MTP experts an hf_ptq export carries unquantized",
    GRAFT: "byte for byte from the release checkpoint (--graft-from): every tensor that is not a routed expert",
    TRANSCODE: "a routed expert the export lacks (the MTP block's) from the release's MXFP4: same E2M1 codes, "
    "power-of-two NVFP4 scales (pipeline.formats.mxfp4_to_nvfp4; exact where the exponents fit e4m3)",
    FALLBACK_INPUT_SCALE: "input_scale of an expert no calibration saw (transformers has no MTP module): the "
    "largest calibrated input_scale of the same projection in the export (NVIDIA's fallback)",
}

# Source forms, from (suffix, stored dtype).
_FLOATS = ("BF16", "F16", "F32")


def source_form(key: str, dtype: str) -> str:
    """What a stored tensor is: nvfp4.{weight,block_scale,global_scale,input_scale}, fp8.weight,
    mxfp4.weight, block_scale (a release .scale), float or int."""
    if key.endswith(".weight_scale_2"):
        return "nvfp4.global_scale" if dtype == "F32" else f"unknown(.weight_scale_2 {dtype})"
    if key.endswith(".weight_scale"):
        return "nvfp4.block_scale" if dtype == "F8_E4M3" else f"unknown(.weight_scale {dtype})"
    if key.endswith(".input_scale"):
        return "nvfp4.input_scale" if dtype == "F32" else f"unknown(.input_scale {dtype})"
    if key.endswith(".scale"):
        return "block_scale" if dtype in ("F8_E8M0", "F32") else f"unknown(.scale {dtype})"
    if dtype == "U8":
        return "nvfp4.weight"
    if dtype == "F8_E4M3":
        return "fp8.weight"
    if dtype == "I8":
        return "mxfp4.weight"
    if dtype in _FLOATS:
        return "float"
    if dtype.startswith(("I", "U")):
        return "int"
    return f"unknown({dtype})"


# What the action writes: the target key itself, the target weight and its .scale sibling, an NVFP4
# weight with its two scales (its .input_scale comes from elsewhere), or nothing.
SELF, WEIGHT_AND_SCALE, NVFP4_WEIGHT, NOTHING = "self", "weight+scale", "nvfp4-weight", "nothing"


@dataclass(frozen=True)
class ActionRule:
    form: str  # source_form(...)
    target_fmt: str  # FP8, NVFP4 or PLAIN
    action: str
    writes: str  # SELF, WEIGHT_AND_SCALE, NVFP4_WEIGHT or NOTHING
    reason: str
    where: str | None = None  # only for targets this regex searches (None: any); the first match wins


_OPERAND = "operand of the weight's conversion (read with X.weight; no key of its own in the target)"
_NO_STATIC_ACT = (
    "NVFP4 activation scale of a layer vLLM builds as FP8 block or BF16 (dynamic activations): "
    "no parameter takes it (seeds S5: KeyError 'fused_wkv_wgate.input_scale')"
)

ACTIONS: tuple[ActionRule, ...] = (
    # FP8 block targets: attention wq_a/wq_b/wkv/wo_a/wo_b, shared experts, indexer wq_b, MTP e/h_proj
    ActionRule("fp8.weight", FP8, COPY, SELF, "already FP8 block, as the release stores it"),
    ActionRule("block_scale", FP8, COPY, SELF, "the FP8 weight's tile scale, as the release stores it"),
    ActionRule(
        "nvfp4.weight",
        FP8,
        NVFP4_TO_FP8,
        WEIGHT_AND_SCALE,
        "vLLM's V4 attention reads these layers as FP8 block (deepseek_v4_fp8_einsum, fused_wqa_wkv); "
        "NVFP4 bytes there were S7/S8/S15",
    ),
    ActionRule("nvfp4.block_scale", FP8, NVFP4_TO_FP8, NOTHING, _OPERAND),
    ActionRule("nvfp4.global_scale", FP8, NVFP4_TO_FP8, NOTHING, _OPERAND),
    ActionRule("nvfp4.input_scale", FP8, DROP, NOTHING, _NO_STATIC_ACT),
    ActionRule(
        "float",
        FP8,
        BF16_TO_FP8,
        WEIGHT_AND_SCALE,
        "a layer ModelOpt left unquantized (wo_a, a grouped linear; or all attention in the experts "
        "recipe) where vLLM reads FP8 block (S13.5)",
    ),
    # NVFP4 targets: routed experts (ModelOptNvFp4FusedMoE)
    ActionRule("nvfp4.weight", NVFP4, KEEP_NVFP4, SELF, "vLLM loads routed experts as ModelOpt NVFP4"),
    ActionRule("nvfp4.block_scale", NVFP4, KEEP_NVFP4, SELF, "NVFP4 block scale of a routed expert"),
    ActionRule("nvfp4.global_scale", NVFP4, KEEP_NVFP4, SELF, "NVFP4 global scale of a routed expert"),
    ActionRule(
        "nvfp4.input_scale",
        NVFP4,
        KEEP_NVFP4,
        SELF,
        "activation scale of a routed expert (vLLM takes the max of w1's and w3's for w13)",
    ),
    ActionRule(
        "float",
        NVFP4,
        BF16_TO_NVFP4,
        NVFP4_WEIGHT,
        "an MTP routed expert that hf_ptq carried unquantized (no calibration reaches the MTP block); in "
        "the layers a float routed expert is an export that skipped the experts, and stays an error",
        where=r"^mtp\.",
    ),
    ActionRule(
        "mxfp4.weight",
        NVFP4,
        DROP,
        NOTHING,
        "the release's MXFP4 routed expert: the NVFP4 expert comes from the quantized export",
    ),
    ActionRule(
        "block_scale",
        NVFP4,
        DROP,
        NOTHING,
        "the release's MXFP4 expert scale: the NVFP4 expert comes from the quantized export",
    ),
    # plain targets: norms, router, compressor, indexer weights_proj, embed, head, hc, sinks, ape
    ActionRule("float", PLAIN, COPY, SELF, "the dtype the release stores"),  # same dtype; else CAST
    ActionRule("int", PLAIN, COPY, SELF, "integer table (hash routing)"),
    ActionRule(
        "nvfp4.weight",
        PLAIN,
        NVFP4_TO_BF16,
        SELF,
        "vLLM builds compressor.fused_wkv_wgate and indexer.weights_proj unquantized (BF16) and the "
        "compressor reads the weight with torch.mm directly (S7, S15)",
    ),
    ActionRule("nvfp4.block_scale", PLAIN, NVFP4_TO_BF16, NOTHING, _OPERAND),
    ActionRule("nvfp4.global_scale", PLAIN, NVFP4_TO_BF16, NOTHING, _OPERAND),
    ActionRule("nvfp4.input_scale", PLAIN, DROP, NOTHING, _NO_STATIC_ACT),
)
_ACTION_INDEX: dict[tuple[str, str], list[ActionRule]] = defaultdict(list)
for _a in ACTIONS:
    _ACTION_INDEX[(_a.form, _a.target_fmt)].append(_a)


def _action_rule(form: str, target_fmt: str, target: str) -> ActionRule | None:
    return next(
        (
            a
            for a in _ACTION_INDEX.get((form, target_fmt), ())
            if a.where is None or re.search(a.where, target)
        ),
        None,
    )


_W13_SCALE = re.compile(r"\.experts\.\d+\.w[13]\.weight_scale(_2)?$")
_UNIFY_REASON = (
    "vLLM keeps w1's weight_scale_2 for the fused w13 and warns, then uses the wrong scale for w3, "
    "when w3's differs: w1 and w3 get one global scale (block scales re-expressed against it)"
)


# ---- mapping one key ----------------------------------------------------------------------------


class MappingError(DsV4Error):
    """A key or a checkpoint that the table cannot map."""


class UnmappedKeyError(MappingError):
    def __init__(self, key: str, dialect: str, message: str, nearest: Rule | None):
        self.key, self.dialect, self.nearest = key, dialect, nearest
        super().__init__(message)


@dataclass(frozen=True)
class Mapping:
    source: str
    target: str  # the native (dialect N) name of the same tensor
    action: str | None  # None when no dtype was given (names only)
    rule: str
    reason: str  # the rename rule's reason, then the action's
    writes: tuple[str, ...] = ()  # target-layout keys this tensor produces
    dtype: str | None = None
    shape: tuple[int, ...] | None = None
    target_fmt: str | None = None


def nearest_rule(key: str, dialect: str | None = None) -> Rule:
    """The rule whose example looks most like ``key`` (indices ignored), among ``dialect``'s rules."""
    pool = [r for r in RULES if dialect is None or dialect in r.dialects] or list(RULES)
    norm = _role(key)

    def score(rule: Rule) -> tuple[float, int]:
        ex = _role(rule.example)
        prefix = len(_common_prefix(norm, ex))
        return (difflib.SequenceMatcher(None, norm, ex, autojunk=False).ratio(), prefix)

    return max(pool, key=score)


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def _matching_rules(key: str, dialect: str) -> list[tuple[Rule, str]]:
    out = []
    for rule in _candidate_rules(_INDEX.sub("0", key), dialect):
        target = rule.apply(key)
        if target is not None:
            out.append((rule, target))
    return out


_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)")


@functools.lru_cache(maxsize=65536)
def _candidate_rules(canonical: str, dialect: str) -> tuple[Rule, ...]:
    """The rules of ``dialect`` matching a key with every index set to 0 (patterns match any index the
    same way, so the 288k keys of V4 Pro cost one regex search per role, not one per rule)."""
    return tuple(r for r in RULES if dialect in r.dialects and r.regex.fullmatch(canonical))


def _maps(key: str, dialect: str) -> bool:
    """Whether a rule of ``dialect`` renames ``key`` onto a tensor of the release layout."""
    return any(_target_of(target) is not None for _, target in _matching_rules(key, dialect))


def _target_of(target: str) -> TargetTensor | None:
    """The target-layout entry of a native key or of a sibling (NVFP4 / .scale) of a target weight."""
    roles = _role_layout()
    hit = roles.get(_role(target))
    if hit is not None:
        return hit
    for suffix in (".weight_scale_2", ".weight_scale", ".input_scale", ".scale"):
        if target.endswith(suffix):
            return roles.get(_role(target[: -len(suffix)] + ".weight"))
    return None


def rename(key: str, dialect: str) -> tuple[Rule, str]:
    """The one rule of ``dialect`` that maps ``key``, and the native key; UnmappedKeyError if none."""
    if dialect not in DIALECTS:
        raise MappingError(f"unknown dialect {dialect!r}; known: {', '.join(DIALECTS)}")
    hits = _matching_rules(key, dialect)
    if len(hits) > 1:  # pragma: no cover - a bug in the table; the tests check every role
        raise AssertionError(f"{key}: rules {[r.name for r, _ in hits]} all match (dialect {dialect})")
    if not hits:
        near = nearest_rule(key, dialect)
        others = [d for d in DIALECTS if d != dialect and _maps(key, d)]
        hint = f"; it is a dialect {'/'.join(others)} key" if others else ""
        raise UnmappedKeyError(
            key,
            dialect,
            f"{key}: no rule of dialect {dialect} maps this key (nearest rule: {near.name}, "
            f"pattern {near.pattern}, e.g. {near.example}){hint}",
            near,
        )
    rule, target = hits[0]
    if _target_of(target) is None:
        near = nearest_rule(key, dialect)
        raise UnmappedKeyError(
            key,
            dialect,
            f"{key}: rule {rule.name} renames it to {target}, which is not a tensor of the release layout "
            f"(nearest rule: {near.name}, e.g. {near.example})",
            near,
        )
    return rule, target


def _base(key: str) -> str:
    """A tensor key without its weight/scale suffix (bare parameters come back unchanged)."""
    for suffix in (".weight_scale_2", ".weight_scale", ".input_scale", ".scale", ".weight"):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return key


def decide_action(target: str, dtype: str, spec: TargetTensor) -> tuple[str, str, tuple[str, ...]]:
    """(action, reason, keys written) for a tensor of stored ``dtype`` renamed to ``target`` whose
    target-layout entry (or its weight's) is ``spec``."""
    form = source_form(target, dtype)
    # a sibling that the target format has no place for is decided by its form alone
    entry = _action_rule(form, spec.fmt, target)
    if entry is None:
        raise MappingError(
            f"{target}: no action turns a {form} tensor ({dtype}) into the target's {spec.fmt} "
            f"{spec.dtype} (e.g. routed experts must arrive quantized as NVFP4)"
        )
    action, reason = entry.action, entry.reason
    if entry.form == "float" and spec.fmt == PLAIN and dtype != spec.dtype:
        if spec.dtype not in _FLOATS:
            raise MappingError(f"{target}: a {dtype} tensor cannot become the target's {spec.dtype}")
        action, reason = CAST, f"{dtype} -> {spec.dtype}, the dtype the release stores"
    if spec.fmt == NVFP4 and entry.action == KEEP_NVFP4 and _W13_SCALE.search(target):
        action, reason = UNIFY_W13, _UNIFY_REASON
    base = _base(target)
    if entry.writes == NOTHING:
        writes: tuple[str, ...] = ()
    elif entry.writes in (WEIGHT_AND_SCALE, NVFP4_WEIGHT):
        if base + ".weight" != target:
            raise MappingError(f"{target}: a {form} tensor ({dtype}) under a suffix that is not .weight")
        if entry.writes == WEIGHT_AND_SCALE:
            writes = (target, scale_key(target))
        else:
            writes = (target, base + ".weight_scale", base + ".weight_scale_2")
    else:
        if _role(target) not in _role_layout():
            raise MappingError(
                f"{target}: a {form} tensor ({dtype}) has no place in the target's {spec.fmt} layout"
            )
        writes = (target,)
    return action, reason, writes


def map_key(key: str, dialect: str, dtype: str | None = None, shape: Iterable[int] | None = None) -> Mapping:
    """Map one key of ``dialect``. With ``dtype`` the action is decided too; without it, names only."""
    shp = None if shape is None else tuple(shape)
    parts = key.split(".")
    indices = [p for p in parts[1:] if p.isdigit()]  # what _INDEX matches: a dotted all-digit part
    if len(indices) <= len(_SENTINELS):
        # Rules and actions treat every index alike: decide once per role, then put the indices back.
        it = iter(_SENTINELS)
        canonical = ".".join([parts[0], *(next(it) if p.isdigit() else p for p in parts[1:])])
        try:
            m = _map_canonical(canonical, dialect, dtype)
        except MappingError:
            pass  # redone below on the real key, so that the message names it
        else:

            def restore(text: str) -> str:
                for sentinel, index in zip(_SENTINELS, indices, strict=False):
                    text = text.replace(sentinel, index)
                return text

            return Mapping(
                key,
                restore(m.target),
                m.action,
                m.rule,
                m.reason,
                tuple(restore(w) for w in m.writes),
                dtype,
                shp,
                m.target_fmt,
            )
    return _map_key(key, dialect, dtype, shp)


_SENTINELS = ("9990001", "9990002", "9990003")


@functools.lru_cache(maxsize=8192)
def _map_canonical(canonical: str, dialect: str, dtype: str | None) -> Mapping:
    return _map_key(canonical, dialect, dtype, None)


def _map_key(key: str, dialect: str, dtype: str | None, shp: tuple[int, ...] | None) -> Mapping:
    rule, target = rename(key, dialect)
    spec = _target_of(target)
    assert spec is not None  # rename checked it
    if dtype is None:
        return Mapping(key, target, None, rule.name, rule.reason, (), None, shp, spec.fmt)
    action, why, writes = decide_action(target, dtype, spec)
    return Mapping(key, target, action, rule.name, f"{rule.reason} | {why}", writes, dtype, shp, spec.fmt)


def detect_dialect(keys: Iterable[str]) -> str:
    """The one dialect whose rules map every key; MappingError naming the best candidate otherwise."""
    keys = list(keys)
    if not keys:
        raise MappingError("no keys: cannot tell the dialect of an empty checkpoint")
    unmapped: dict[str, list[str]] = {}
    for d in DIALECTS:
        # rules treat every index alike, so each role (indices set to 0) is decided once: V4 Pro's 288k
        # keys are a few hundred roles
        maps = {c: _maps(c, d) for c in {_INDEX.sub("0", k) for k in keys}}
        unmapped[d] = [k for k in keys if not maps[_INDEX.sub("0", k)]]
    full = [d for d, bad in unmapped.items() if not bad]
    if len(full) == 1:
        return full[0]
    if len(full) > 1:
        raise MappingError(
            f"keys fit dialects {', '.join(full)} alike (e.g. {keys[0]}); name the dialect explicitly"
        )
    best = min(DIALECTS, key=lambda d: len(unmapped[d]))
    sample = unmapped[best][:3]
    raise MappingError(
        f"no dialect maps every key; closest is {best} ({DIALECTS[best]}), which cannot map "
        f"{len(unmapped[best])} key(s), e.g. "
        + "; ".join(f"{k} (nearest rule {nearest_rule(k, best).name})" for k in sample)
    )


# ---- planning a checkpoint ---------------------------------------------------------------------


# Target keys an H/X export cannot have, with why; plan() lists them in Plan.absent instead of failing.
@dataclass(frozen=True)
class Lack:
    """Target keys an export of ``dialects`` may lack: ``plan`` lists them in Plan.absent with ``why``.
    ``with_mtp``: the entry applies when the export does (True) or does not (False) carry the MTP block."""

    pattern: str  # fullmatched against the target key
    dialects: tuple[str, ...]
    why: str
    with_mtp: bool = False


EXPORT_LACKS: tuple[Lack, ...] = (
    Lack(
        r"mtp\.\d+\.ffn\.experts\.\d+\.w[123]\.input_scale",
        ("X",),
        "no calibration reaches the MTP block (hf_ptq re-attaches it unquantized), so no activation scale: "
        "dsv4 convert gives the fallback (the largest calibrated one of the same projection)",
        with_mtp=True,
    ),
    Lack(
        r"mtp\.\d+\..+",
        ("H", "X"),
        "transformers' DeepseekV4ForCausalLM has no MTP module (mtp.* is in "
        "_keys_to_ignore_on_load_unexpected), so ModelOpt exports carry none: take them from the "
        "release (--graft-from) or serve without the MTP draft",
    ),
)


@dataclass
class Plan:
    dialect: str
    mappings: list[Mapping]
    absent: list[tuple[str, str]] = field(default_factory=list)  # (target key, why the input lacks it)
    layout: dict[str, TargetTensor] = field(default_factory=dict)  # target_layout(config), as planned against

    def counts(self) -> Counter[tuple[str, str]]:
        """(rule, action) -> number of source keys."""
        return Counter((m.rule, m.action or "?") for m in self.mappings)


def _expected_source_shape(m: Mapping, spec: TargetTensor) -> tuple[int, ...] | None:
    """The shape a source tensor must have for its action, or None where it is not determined."""
    if m.action in (COPY, CAST, KEEP_NVFP4, UNIFY_W13, BF16_TO_FP8):
        if m.action == BF16_TO_FP8 or m.target == spec.key:
            return spec.shape
        return None
    if m.action in (NVFP4_TO_FP8, NVFP4_TO_BF16) and m.writes:
        rows, cols = spec.shape
        return (rows, cols // 2)
    if m.action == BF16_TO_NVFP4:
        rows, packed = spec.shape  # the target's packed weight
        return (rows, packed * 2)
    return None


def _as_triple(t: Any) -> tuple[str, str, tuple[int, ...]]:
    if isinstance(t, tuple | list):
        key, dtype, shape = t
    else:
        key, dtype, shape = t.key, t.dtype, t.shape
    return key, dtype, tuple(shape)


def plan(tensors: Iterable[Any], config: MappingABC, dialect: str | None = None) -> Plan:
    """Map every (key, dtype, shape) (tuples or objects with .key/.dtype/.shape) and check the result
    writes each key of ``target_layout(config)`` exactly once with the right shape; MappingError
    listing every problem (unmapped keys, duplicates, missing keys, wrong shapes) otherwise."""
    triples = [_as_triple(t) for t in tensors]
    if dialect is None:
        dialect = detect_dialect(k for k, _, _ in triples)
    layout = target_layout(config)
    problems: list[str] = []
    mappings: list[Mapping] = []
    for key, dtype, shape in triples:
        try:
            mappings.append(map_key(key, dialect, dtype, shape))
        except MappingError as exc:
            problems.append(str(exc))
    writers: dict[str, list[str]] = defaultdict(list)
    for m in mappings:
        for w in m.writes:
            writers[w].append(m.source)
        spec = layout.get(m.target) or layout.get(_base(m.target) + ".weight")
        for w in m.writes:
            if w not in layout:
                problems.append(f"{m.source}: writes {w}, which this config's layout does not have")
        if spec is not None and m.action in (COPY, KEEP_NVFP4, UNIFY_W13) and m.dtype != spec.dtype:
            problems.append(f"{m.source}: {m.dtype}, but {m.action} into {spec.key} needs {spec.dtype}")
        if spec is not None and m.shape is not None:
            want = _expected_source_shape(m, spec)
            if want is not None and want != m.shape:
                problems.append(
                    f"{m.source}: shape {list(m.shape)} but {m.action} into {spec.key} {list(spec.shape)} "
                    f"needs {list(want)}"
                )
    # an NVFP4 weight is converted from three tensors: its block and global scales must be there
    present = {m.source for m in mappings}
    for m in mappings:
        if m.action in (NVFP4_TO_FP8, NVFP4_TO_BF16) and m.writes:
            base = _base(m.source)
            lacking = [base + s for s in (".weight_scale", ".weight_scale_2") if base + s not in present]
            if lacking:
                problems.append(f"{m.source}: {m.action} needs {', '.join(lacking)}, which the input lacks")
    for w, sources in writers.items():
        if len(sources) > 1:
            problems.append(f"{w}: written by {len(sources)} source keys: {', '.join(sorted(sources))}")
    absent: list[tuple[str, str]] = []
    missing: list[str] = []
    has_mtp = any(w.startswith("mtp.") for w in writers)
    for key in layout:
        if key in writers:
            continue
        why = next(
            (
                lack.why
                for lack in EXPORT_LACKS
                if dialect in lack.dialects and lack.with_mtp == has_mtp and re.fullmatch(lack.pattern, key)
            ),
            None,
        )
        if why is None:
            missing.append(key)
        else:
            absent.append((key, why))
    if missing:
        shown = ", ".join(missing[:20]) + (f", ... ({len(missing)} in all)" if len(missing) > 20 else "")
        problems.append(f"{len(missing)} target key(s) no source key writes: {shown}")
    if problems:
        raise MappingError(
            f"cannot plan the conversion of {len(triples)} dialect-{dialect} tensors: "
            + one_line(problems, show=len(problems))
        )
    return Plan(dialect, mappings, absent, layout)


# ---- docs ----------------------------------------------------------------------------------------


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def rule_table_markdown() -> str:
    """docs/mapping.md, generated from RULES and ACTIONS (a test keeps the file equal to this)."""
    lines = [
        "# Key mapping: every input dialect -> the release layout",
        "",
        "Generated by `pipeline.mapping.rule_table_markdown()` from `RULES` and `ACTIONS`; do not edit",
        "by hand (`tests/unit/test_mapping.py` fails when this file and the table differ). Regenerate:",
        "",
        "```",
        "python -c 'from pipeline.mapping import rule_table_markdown as t; print(t(), end=\"\")' > docs/mapping.md",
        "```",
        "",
        "## Dialects",
        "",
        "| dialect | what |",
        "|---|---|",
        *(f"| {d} | {_md(what)} |" for d, what in DIALECTS.items()),
        "",
        "## Rename rules",
        "",
        "A key of dialect D is renamed by the one rule of D whose pattern matches the whole key; a key",
        "no rule matches is an error naming the nearest rule. Targets are native (dialect N) keys.",
        "",
        "| rule | dialects | pattern | target | example | reason |",
        "|---|---|---|---|---|---|",
    ]
    for r in RULES:
        lines.append(
            f"| `{r.name}` | {','.join(r.dialects)} | `{_md(r.pattern)}` | `{_md(r.target)}` | "
            f"`{r.example}` | {_md(r.reason)} |"
        )
    lines += [
        "",
        "## Actions",
        "",
        "Decided by the source tensor's form (its suffix and stored dtype) and the format the release",
        "layout (`pipeline.release_layout`) gives the target weight; routed experts become NVFP4.",
        "A float tensor whose dtype differs from the release's is cast; expert w1/w3 `weight_scale`",
        "and `weight_scale_2` get `unify-w13-global-scale` instead of `keep-nvfp4`.",
        "",
        "| action | meaning |",
        "|---|---|",
        *(f"| `{a}` | {_md(m)} |" for a, m in ACTION_NAMES.items()),
        "",
        "| source form | target format | only targets matching | action | writes | reason |",
        "|---|---|---|---|---|---|",
        *(
            f"| {a.form} | {a.target_fmt} | {f'`{_md(a.where)}`' if a.where else 'any'} | `{a.action}` | "
            f"{a.writes} | {_md(a.reason)} |"
            for a in ACTIONS
        ),
        "",
        "## Input keys the target cannot get from an export",
        "",
        "| target keys | dialects | why |",
        "|---|---|---|",
        *(
            f"| `{_md(lack.pattern)}` | {','.join(lack.dialects)} | "
            f"{'(when the export carries the MTP block) ' if lack.with_mtp else ''}{_md(lack.why)} |"
            for lack in EXPORT_LACKS
        ),
        "",
    ]
    return "\n".join(lines)
