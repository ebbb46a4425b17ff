"""The rename table, as data: :data:`DIALECTS` and :data:`RULES`, one :class:`Rule` per tensor role.

A key of dialect D is renamed by the one rule of D whose pattern fullmatches it; the target is the native
(dialect N) key. Every rule carries its reason and an example key (the tests map each example; the docs
list them). This is the one table the converter, the vLLM plugin, the snapshots and docs/mapping.md read.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

DIALECTS: dict[str, str] = {
    "N": "native release layout (DeepSeek-V4-Pro on the hub; the layout this pipeline writes)",
    "H": "transformers module names, experts split per expert (the seeds' ModelOpt 0.45 export)",
    "X": "ModelOpt 0.47 + transformers 5.23 export: native names under model., a few exceptions",
}

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
