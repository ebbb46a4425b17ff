"""Deterministic tiny DeepSeek V4 checkpoints in the release layout (dialect N, BRIEF §3).

``tiny_config(preset)`` returns a config.json dict with the same keys as the real release's config,
shrunk; ``build_tiny_release(out_dir, preset, seed)`` writes that config and exactly the tensors
``pipeline.release_layout.release_tensors(config)`` lists for it, quantized the way the release ships
them (FP8 block weights with UE8M0 tile scales, MXFP4 routed experts), from random weights of a sane
init scale so that a forward pass is numerically meaningful.

Presets:

* ``micro``: seconds on a CPU with transformers. 4 layers + 1 MTP block covering every block kind:
  layer 0 hash-routed HCA (ratio 128), layer 1 hash-routed CSA (ratio 4, with indexer), layer 2
  sliding-only (ratio 0), layer 3 top-k-routed CSA; the MTP block is sliding-only like the release's.
  Every FP8 dimension is either < 128 (one partial tile) or a multiple of 128, because transformers
  5.23 derives the FP8 block size from the scale grid (rows // scale_rows): a dimension above 128
  that is not a multiple of 128 would be dequantized with the wrong tile size there.
* ``vllm-shaped``: vLLM's V4 kernels need realistic attention shapes (BRIEF §6): head_dim 512,
  rope dim 64, 128-aligned FP8 tiles, real indexer dims (64 heads x 128); hidden 512, 8 heads,
  8 experts, 2 layers (hash HCA, CSA) + 1 MTP block.

Only torch, safetensors and the pipeline's own format code are needed (unit tier).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeline.formats import fp8_block_quantize, mxfp4_quantize
from pipeline.release_layout import FP8, MXFP4, WeightSpec, release_tensors, release_weights

CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
PRESETS = ("micro", "vllm-shaped")

# The real release's config.json (../shared/reference/deepseek-v4-pro/config.json), key for key, in
# its order; the presets override the sizes.
_RELEASE_CONFIG: dict = {
    "architectures": ["DeepseekV4ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "hc_eps": 1e-06,
    "hc_mult": 4,
    "hc_sinkhorn_iters": 20,
    "head_dim": 512,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "index_head_dim": 128,
    "index_n_heads": 64,
    "index_topk": 1024,
    "initializer_range": 0.02,
    "max_position_embeddings": 1048576,
    "model_type": "deepseek_v4",
    "moe_intermediate_size": 3072,
    "n_routed_experts": 384,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 128,
    "num_experts_per_tok": 6,
    "num_hidden_layers": 61,
    "num_hash_layers": 3,
    "num_key_value_heads": 1,
    "num_nextn_predict_layers": 1,
    "o_groups": 16,
    "o_lora_rank": 1024,
    "q_lora_rank": 1536,
    "qk_rope_head_dim": 64,
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "scale_fmt": "ue8m0",
        "weight_block_size": [128, 128],
    },
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 16,
        "original_max_position_embeddings": 65536,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sqrtsoftplus",
    "sliding_window": 128,
    "swiglu_limit": 10.0,
    "tie_word_embeddings": False,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.57.1",
    "use_cache": True,
    "vocab_size": 129280,
    "compress_rope_theta": 160000,
    "compress_ratios": [128, 128, *([4, 128] * 29), 4, 0],
}

_PRESET_OVERRIDES: dict[str, dict] = {
    "micro": {
        "hidden_size": 256,
        "num_attention_heads": 4,
        "head_dim": 64,
        "qk_rope_head_dim": 16,
        "q_lora_rank": 128,
        "o_groups": 2,
        "o_lora_rank": 64,
        "index_n_heads": 4,
        "index_head_dim": 32,
        "index_topk": 4,  # < the compressed entries of a 32-token sequence, so top-k selection matters
        "moe_intermediate_size": 128,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "num_hidden_layers": 4,
        "num_hash_layers": 2,
        "sliding_window": 16,  # < the test sequence, so the window mask matters
        "vocab_size": 512,
        "compress_ratios": [128, 4, 0, 4, 0],
    },
    "vllm-shaped": {
        "hidden_size": 512,
        "num_attention_heads": 8,
        "head_dim": 512,
        "qk_rope_head_dim": 64,
        "q_lora_rank": 256,
        "o_groups": 2,
        "o_lora_rank": 256,
        "index_n_heads": 64,
        "index_head_dim": 128,
        "index_topk": 512,
        "moe_intermediate_size": 256,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "num_hidden_layers": 2,
        "num_hash_layers": 1,
        "vocab_size": 1024,
        "compress_ratios": [128, 4, 0],
    },
}


def tiny_config(preset: str = "micro") -> dict:
    """A config.json dict in the release's style (same keys, same order) for a tiny preset."""
    if preset not in _PRESET_OVERRIDES:
        raise ValueError(f"unknown tiny preset {preset!r}; known: {', '.join(PRESETS)}")
    config = copy.deepcopy(_RELEASE_CONFIG)
    config.update(copy.deepcopy(_PRESET_OVERRIDES[preset]))
    _check_config(config, preset)
    return config


def _check_config(c: dict, preset: str) -> None:
    """The dimension rules the V4 architecture (and transformers' module shapes) rely on."""
    problems = []
    layers = c["num_hidden_layers"]
    if len(c["compress_ratios"]) != layers + c["num_nextn_predict_layers"]:
        problems.append("compress_ratios needs num_hidden_layers + num_nextn_predict_layers entries")
    if any(r not in (0, 4, 128) for r in c["compress_ratios"]):
        problems.append("transformers 5.23 maps only compress ratios 0, 4 and 128 to layer types")
    if c["num_attention_heads"] % c["o_groups"]:
        problems.append("o_groups must divide num_attention_heads")
    if c["qk_rope_head_dim"] % 2 or c["qk_rope_head_dim"] > c["head_dim"]:
        problems.append("qk_rope_head_dim must be even and <= head_dim")
    if c["num_hash_layers"] > layers:
        problems.append("num_hash_layers > num_hidden_layers")
    if c["num_experts_per_tok"] > c["n_routed_experts"]:
        problems.append("num_experts_per_tok > n_routed_experts")
    for dim in ("hidden_size", "moe_intermediate_size"):
        if c[dim] % 32:
            problems.append(f"{dim} must divide by the MXFP4 block of 32")
    for w in release_weights(c):
        if w.fmt == FP8 and any(d > 128 and d % 128 for d in w.shape):
            problems.append(f"{w.name} {w.shape}: an FP8 dim above 128 must be a multiple of 128")
    if problems:
        raise ValueError(f"tiny preset {preset!r} is inconsistent: " + "; ".join(problems))


# ---- weights ----------------------------------------------------------------------------------


def _generator(seed: int, name: str) -> torch.Generator:
    """One generator per logical weight, seeded from (seed, name): a tensor's values do not depend on
    which other tensors the layout lists, and the build is deterministic (sha256, not Python's hash).
    torch's CPU generator (mt19937) keeps only the low 32 bits of a seed, so both parts are hashed
    into those 32 bits rather than packed side by side."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:4], "little"))


def _matrix(g: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    """A BF16 weight with std 1/sqrt(fan_in): activations stay O(1) through each projection."""
    return (torch.randn(shape, generator=g) / math.sqrt(shape[-1])).to(torch.bfloat16)


def _plain(spec: WeightSpec, config: dict, g: torch.Generator) -> torch.Tensor:
    name, shape = spec.name, spec.shape
    dtype = {"BF16": torch.bfloat16, "F32": torch.float32, "I64": torch.int64}[spec.dtype]
    if name.endswith(".gate.tid2eid"):
        # Hash routing: each token picks num_experts_per_tok distinct valid expert ids.
        vocab, k = shape
        order = torch.rand((vocab, config["n_routed_experts"]), generator=g).argsort(dim=-1)
        return order[:, :k].contiguous().to(torch.int64)
    if name.endswith("norm.weight"):
        x = 1.0 + 0.05 * torch.randn(shape, generator=g)  # RMSNorm gains near 1
    elif name == "embed.weight":
        x = torch.randn(shape, generator=g)
    elif name.endswith((".weight", "_fn")):
        # head, router gate, compressor / indexer projections, weights_proj, hyper-connection fn
        return _matrix(g, shape).to(dtype)
    elif name.endswith("_scale"):
        x = 1.0 + 0.1 * torch.randn(shape, generator=g)  # hyper-connection scales near 1
    elif name.endswith(("_base", ".ape", ".attn_sink")):
        x = 0.1 * torch.randn(shape, generator=g)
    elif name.endswith(".gate.bias"):
        x = 0.01 * torch.randn(shape, generator=g)  # router score correction bias
    else:
        raise AssertionError(f"tiny factory: no init rule for {name} {spec.dtype} {shape}")
    return x.to(dtype)


def tiny_tensors(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor of ``release_tensors(config)``, keyed as the release keys them, in layout order."""
    out: dict[str, torch.Tensor] = {}
    for spec in release_weights(config):
        g = _generator(seed, spec.name)
        if spec.fmt == FP8:
            q, scale = fp8_block_quantize(_matrix(g, spec.shape), scale_fmt="ue8m0")
            out[f"{spec.name}.weight"], out[f"{spec.name}.scale"] = q, scale
        elif spec.fmt == MXFP4:
            packed, scale = mxfp4_quantize(_matrix(g, spec.shape))
            out[f"{spec.name}.weight"], out[f"{spec.name}.scale"] = packed, scale
        else:
            out[spec.name] = _plain(spec, config, g)
    return out


# ---- files ------------------------------------------------------------------------------------


def _shard_of(key: str, config: dict) -> int:
    """Shard 0: top level; then one shard per layer; the MTP blocks share the last shard."""
    head, _, rest = key.partition(".")
    if head == "layers":
        return 1 + int(rest.split(".", 1)[0])
    if head == "mtp":
        return 1 + config["num_hidden_layers"]
    return 0


def write_checkpoint_dir(out_dir: str | os.PathLike, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """config.json + sharded safetensors (top level, one per layer, MTP) + model.safetensors.index.json.

    Shared by the factory and by tests that write derived checkpoints (e.g. a BF16 dequantization)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups: dict[int, dict[str, torch.Tensor]] = {}
    for key in sorted(tensors):
        groups.setdefault(_shard_of(key, config), {})[key] = tensors[key]
    count = len(groups)
    weight_map: dict[str, str] = {}
    total = 0
    for n, shard in enumerate(sorted(groups), start=1):
        name = f"model-{n:05d}-of-{count:05d}.safetensors"
        save_file(
            {k: t.contiguous() for k, t in groups[shard].items()}, out / name, metadata={"format": "pt"}
        )
        weight_map.update(dict.fromkeys(groups[shard], name))
        total += sum(t.numel() * t.element_size() for t in groups[shard].values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return out


def build_tiny_release(out_dir: str | os.PathLike, preset: str = "micro", seed: int = 0) -> Path:
    """Write a tiny release-layout checkpoint (config.json, shards, index) to ``out_dir``; return it.

    Same preset and seed give byte-identical files. The key set is exactly
    ``release_tensors(tiny_config(preset))``, with the release's dtypes and shapes."""
    config = tiny_config(preset)
    tensors = tiny_tensors(config, seed)
    expected = {t.key for t in release_tensors(config)}
    if tensors.keys() != expected:  # cannot happen by construction; cheap to make sure
        raise AssertionError(
            f"tiny factory keys differ from the layout: {sorted(tensors.keys() ^ expected)[:5]}"
        )
    return write_checkpoint_dir(out_dir, config, tensors)
