"""The DeepSeek V4 release layout (dialect N), derived from config.json: every key, dtype and shape.

This is the one place that says which tensors the release holds and in which format. It reproduces the
real V4 Pro table (../shared/reference: 145,116 tensors) exactly from its config, so the tiny-model
factory, the dequant planner and the validator can trust it for any config shaped like the release's.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

FP8_BLOCK = (128, 128)
MXFP4_BLOCK = 32

# Format of a weight in the release; the scale sibling follows from it.
FP8 = "fp8-block"  # F8_E4M3 .weight + F8_E8M0 .scale, one per 128x128 tile
MXFP4 = "mxfp4"  # I8 .weight [out, in/2] + F8_E8M0 .scale [out, in/32]
PLAIN = "plain"  # stored as is (BF16, F32, I64)


# How each quantized format is stored: (weight dtype, scale dtype). The scale of `X.weight` is `X.scale`.
STORED_DTYPES: dict[str, tuple[str, str]] = {FP8: ("F8_E4M3", "F8_E8M0"), MXFP4: ("I8", "F8_E8M0")}
WEIGHT_SUFFIX, SCALE_SUFFIX = ".weight", ".scale"


def scale_key(weight_key: str) -> str:
    """The release's scale sibling of a quantized weight: `X.weight` -> `X.scale`."""
    if not weight_key.endswith(WEIGHT_SUFFIX):
        raise ValueError(f"{weight_key}: a quantized weight's key ends in {WEIGHT_SUFFIX}")
    return weight_key[: -len(WEIGHT_SUFFIX)] + SCALE_SUFFIX


def stored_format(weight_dtype: str, scale_dtype: str | None) -> str:
    """FP8, MXFP4 or PLAIN from a weight's stored dtype and its `.scale` sibling's (None if it has none)."""
    for fmt, dtypes in STORED_DTYPES.items():
        if (weight_dtype, scale_dtype) == dtypes:
            return fmt
    return PLAIN


# A routed expert's module name in the release: `<layers|mtp>.<N>.ffn.experts.<E>.<w1|w2|w3>`. The
# spec below builds it with routed_expert(); fix-config and transcode-scan parse it with this pattern.
ROUTED_EXPERT = re.compile(
    r"^(?P<block>(?P<kind>layers|mtp)\.(?P<n>\d+))\.ffn\.experts\.(?P<e>\d+)\.(?P<w>w[123])$"
)
EXPERT_PROJECTIONS = ("w1", "w2", "w3")  # gate, down, up (w1 and w3 fuse into vLLM's w13)


def routed_expert(block: str, expert: int, projection: str) -> str:
    """`layers.3` + 17 + `w1` -> `layers.3.ffn.experts.17.w1` (the module name; add .weight/.scale)."""
    return f"{block}.ffn.experts.{expert}.{projection}"


@dataclass(frozen=True)
class TensorSpec:
    key: str
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]


@dataclass(frozen=True)
class WeightSpec:
    """A logical weight: its name without suffix, its format and its unquantized [out, in] or shape."""

    name: str
    fmt: str
    shape: tuple[int, ...]
    dtype: str = "BF16"  # for PLAIN: the stored dtype

    def tensors(self) -> list[TensorSpec]:
        weight = f"{self.name}{WEIGHT_SUFFIX}"
        if self.fmt == FP8:
            rows, cols = self.shape
            grid = (math.ceil(rows / FP8_BLOCK[0]), math.ceil(cols / FP8_BLOCK[1]))
            w_dtype, s_dtype = STORED_DTYPES[FP8]
            return [TensorSpec(weight, w_dtype, self.shape), TensorSpec(scale_key(weight), s_dtype, grid)]
        if self.fmt == MXFP4:
            rows, cols = self.shape
            w_dtype, s_dtype = STORED_DTYPES[MXFP4]
            return [
                TensorSpec(weight, w_dtype, (rows, cols // 2)),
                TensorSpec(scale_key(weight), s_dtype, (rows, cols // MXFP4_BLOCK)),
            ]
        return [TensorSpec(self.name, self.dtype, self.shape)]


def compress_ratio(config: Mapping, block: int) -> int:
    """Compression ratio of block ``block`` (layers first, then the MTP blocks); <= 1 means sliding window only."""
    ratios = config.get("compress_ratios")
    if ratios is None:
        return 0
    return int(ratios[block])


def layer_kind(config: Mapping, block: int) -> str:
    """'sliding' (no compressor), 'csa' (ratio 4: compressor + indexer) or 'hca' (any other ratio > 1)."""
    ratio = compress_ratio(config, block)
    if ratio <= 1:
        return "sliding"
    return "csa" if ratio == 4 else "hca"


def _compressor(prefix: str, ratio: int, head_dim: int, hidden: int) -> list[WeightSpec]:
    # Ratio 4 compresses overlapping windows: twice the head dim of projections and position bias.
    width = head_dim * (2 if ratio == 4 else 1)
    return [
        WeightSpec(f"{prefix}.ape", PLAIN, (ratio, width), "F32"),
        WeightSpec(f"{prefix}.norm.weight", PLAIN, (head_dim,)),
        WeightSpec(f"{prefix}.wgate.weight", PLAIN, (width, hidden)),
        WeightSpec(f"{prefix}.wkv.weight", PLAIN, (width, hidden)),
    ]


def _block_weights(config: Mapping, prefix: str, block: int, hash_routed: bool) -> list[WeightSpec]:
    """One transformer block (a layer, or the body of an MTP block)."""
    hidden = config["hidden_size"]
    heads, head_dim = config["num_attention_heads"], config["head_dim"]
    q_rank, groups, o_rank = config["q_lora_rank"], config["o_groups"], config["o_lora_rank"]
    experts, inter = config["n_routed_experts"], config["moe_intermediate_size"]
    shared_inter = inter * config.get("n_shared_experts", 1)
    hc = config["hc_mult"]
    hc_mix = (2 + hc) * hc
    a = f"{prefix}.attn"
    out: list[WeightSpec] = [
        WeightSpec(f"{a}.attn_sink", PLAIN, (heads,), "F32"),
        WeightSpec(f"{a}.kv_norm.weight", PLAIN, (head_dim,)),
        WeightSpec(f"{a}.q_norm.weight", PLAIN, (q_rank,)),
        WeightSpec(f"{a}.wkv", FP8, (head_dim, hidden)),
        WeightSpec(f"{a}.wo_a", FP8, (groups * o_rank, heads * head_dim // groups)),
        WeightSpec(f"{a}.wo_b", FP8, (hidden, groups * o_rank)),
        WeightSpec(f"{a}.wq_a", FP8, (q_rank, hidden)),
        WeightSpec(f"{a}.wq_b", FP8, (heads * head_dim, q_rank)),
    ]
    ratio = compress_ratio(config, block)
    if ratio > 1:
        out += _compressor(f"{a}.compressor", ratio, head_dim, hidden)
    if ratio == 4:
        index_heads, index_dim = config["index_n_heads"], config["index_head_dim"]
        out += _compressor(f"{a}.indexer.compressor", ratio, index_dim, hidden)
        out += [
            WeightSpec(f"{a}.indexer.weights_proj.weight", PLAIN, (index_heads, hidden)),
            WeightSpec(f"{a}.indexer.wq_b", FP8, (index_heads * index_dim, q_rank)),
        ]
    f = f"{prefix}.ffn"
    expert_shapes = {"w1": (inter, hidden), "w2": (hidden, inter), "w3": (inter, hidden)}
    for e in range(experts):
        out += [WeightSpec(routed_expert(prefix, e, w), MXFP4, expert_shapes[w]) for w in EXPERT_PROJECTIONS]
    out.append(WeightSpec(f"{f}.gate.weight", PLAIN, (experts, hidden)))
    if hash_routed:
        out.append(
            WeightSpec(
                f"{f}.gate.tid2eid", PLAIN, (config["vocab_size"], config["num_experts_per_tok"]), "I64"
            )
        )
    else:
        out.append(WeightSpec(f"{f}.gate.bias", PLAIN, (experts,), "F32"))
    out += [
        WeightSpec(f"{f}.shared_experts.w1", FP8, (shared_inter, hidden)),
        WeightSpec(f"{f}.shared_experts.w2", FP8, (hidden, shared_inter)),
        WeightSpec(f"{f}.shared_experts.w3", FP8, (shared_inter, hidden)),
        WeightSpec(f"{prefix}.attn_norm.weight", PLAIN, (hidden,)),
        WeightSpec(f"{prefix}.ffn_norm.weight", PLAIN, (hidden,)),
    ]
    for site in ("attn", "ffn"):
        out += [
            WeightSpec(f"{prefix}.hc_{site}_base", PLAIN, (hc_mix,), "F32"),
            WeightSpec(f"{prefix}.hc_{site}_fn", PLAIN, (hc_mix, hc * hidden), "F32"),
            WeightSpec(f"{prefix}.hc_{site}_scale", PLAIN, (3,), "F32"),
        ]
    return out


def _hc_head(prefix: str, hc: int, hidden: int) -> list[WeightSpec]:
    return [
        WeightSpec(f"{prefix}hc_head_base", PLAIN, (hc,), "F32"),
        WeightSpec(f"{prefix}hc_head_fn", PLAIN, (hc, hc * hidden), "F32"),
        WeightSpec(f"{prefix}hc_head_scale", PLAIN, (1,), "F32"),
    ]


def release_weights(config: Mapping) -> list[WeightSpec]:
    """Every logical weight of the release, in a stable order (top level, layers, MTP blocks)."""
    hidden, vocab, hc = config["hidden_size"], config["vocab_size"], config["hc_mult"]
    layers = config["num_hidden_layers"]
    out = [
        WeightSpec("embed.weight", PLAIN, (vocab, hidden)),
        WeightSpec("head.weight", PLAIN, (vocab, hidden)),
        WeightSpec("norm.weight", PLAIN, (hidden,)),
        *_hc_head("", hc, hidden),
    ]
    hash_layers = config.get("num_hash_layers", 0)
    for i in range(layers):
        out += _block_weights(config, f"layers.{i}", i, hash_routed=i < hash_layers)
    for j in range(config.get("num_nextn_predict_layers", 0)):
        p = f"mtp.{j}"
        out += _block_weights(config, p, layers + j, hash_routed=False)
        out += [
            WeightSpec(f"{p}.e_proj", FP8, (hidden, hidden)),
            WeightSpec(f"{p}.h_proj", FP8, (hidden, hidden)),
            WeightSpec(f"{p}.enorm.weight", PLAIN, (hidden,)),
            WeightSpec(f"{p}.hnorm.weight", PLAIN, (hidden,)),
            WeightSpec(f"{p}.norm.weight", PLAIN, (hidden,)),
            *_hc_head(f"{p}.", hc, hidden),
        ]
    return out


def release_tensors(config: Mapping) -> Iterator[TensorSpec]:
    """Every stored tensor of the release (weights and their scale siblings)."""
    for weight in release_weights(config):
        yield from weight.tensors()
