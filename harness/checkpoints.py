"""Small hand-built checkpoints in the release layout (FP8 attention, MXFP4 experts) or in BF16, and a
content digest of a checkpoint directory that is cheap on sparse files."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeline.checkpoint.reader import CONFIG_NAME, INDEX_NAME
from pipeline.formats import as_e8m0, fp8_block_quantize, pack_nibbles

TINY = {
    "hidden": 256,
    "q_lora": 192,
    "heads_x_dim": 512,
    "head_dim": 128,
    "o_a": 384,
    "o_b_in": 256,
    "inter": 128,
    "vocab": 512,
    "experts": 4,
    "layers": 2,
    "hash_layers": 1,
}
_CHUNK = 1 << 16
TINY_RATIOS = [4, 128, 0]  # layer 0: compressor + indexer; layer 1: compressor; MTP: neither


def tiny_config(layers: int = TINY["layers"], experts: int = TINY["experts"]) -> dict:
    return {
        "architectures": ["DeepseekV4ForCausalLM"],
        "model_type": "deepseek_v4",
        "hidden_size": TINY["hidden"],
        "num_hidden_layers": layers,
        "num_nextn_predict_layers": 1,
        "n_routed_experts": experts,
        "n_shared_experts": 1,
        "num_hash_layers": TINY["hash_layers"],
        "moe_intermediate_size": TINY["inter"],
        "vocab_size": TINY["vocab"],
        "compress_ratios": list(TINY_RATIOS),
        "quantization_config": {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "scale_fmt": "ue8m0",
            "weight_block_size": [128, 128],
        },
        "torch_dtype": "bfloat16",
    }


def _tiny_tensors(layout: str, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, inter, v, e = TINY["hidden"], TINY["inter"], TINY["vocab"], TINY["experts"]
    out: dict[str, torch.Tensor] = {}

    def rand(*shape, dtype=torch.bfloat16):
        return (torch.randn(*shape, generator=g) * 0.05).to(dtype)

    def fp8(name, rows, cols):
        w = torch.randn(rows, cols, generator=g) * 0.05
        if layout == "bf16":
            out[f"{name}.weight"] = w.to(torch.bfloat16)
        else:
            out[f"{name}.weight"], out[f"{name}.scale"] = fp8_block_quantize(w)

    def mxfp4(name, rows, cols):
        if layout == "bf16":
            out[f"{name}.weight"] = rand(rows, cols)
            return
        codes = torch.randint(0, 16, (rows, cols), generator=g, dtype=torch.uint8)
        out[f"{name}.weight"] = pack_nibbles(codes).view(torch.int8)
        out[f"{name}.scale"] = as_e8m0(
            torch.randint(118, 128, (rows, cols // 32), generator=g, dtype=torch.uint8)
        )

    out["embed.weight"] = rand(v, h)
    out["head.weight"] = rand(v, h)
    out["norm.weight"] = rand(h)
    for s, shape in (("fn", (4, 4 * h)), ("base", (4,)), ("scale", (1,))):
        out[f"hc_head_{s}"] = rand(*shape, dtype=torch.float32)
    blocks = [(f"layers.{n}", n, TINY_RATIOS[n]) for n in range(TINY["layers"])] + [
        ("mtp.0", None, TINY_RATIOS[-1])
    ]
    for p, n, ratio in blocks:
        fp8(f"{p}.attn.wq_a", TINY["q_lora"], h)
        fp8(f"{p}.attn.wq_b", TINY["heads_x_dim"], TINY["q_lora"])
        fp8(f"{p}.attn.wkv", TINY["head_dim"], h)
        fp8(f"{p}.attn.wo_a", TINY["o_a"], TINY["o_b_in"])
        fp8(f"{p}.attn.wo_b", h, TINY["heads_x_dim"])
        out[f"{p}.attn.q_norm.weight"] = rand(TINY["q_lora"])
        out[f"{p}.attn.kv_norm.weight"] = rand(TINY["head_dim"])
        out[f"{p}.attn.attn_sink"] = rand(4, dtype=torch.float32)
        if ratio > 1:
            for w in ("wkv", "wgate"):
                out[f"{p}.attn.compressor.{w}.weight"] = rand(TINY["head_dim"], h)
            out[f"{p}.attn.compressor.ape"] = rand(ratio, TINY["head_dim"], dtype=torch.float32)
            out[f"{p}.attn.compressor.norm.weight"] = rand(TINY["head_dim"])
        if ratio == 4:
            fp8(f"{p}.attn.indexer.wq_b", 256, TINY["q_lora"])
            out[f"{p}.attn.indexer.weights_proj.weight"] = rand(4, h)
            for w in ("wkv", "wgate"):
                out[f"{p}.attn.indexer.compressor.{w}.weight"] = rand(64, h)
            out[f"{p}.attn.indexer.compressor.ape"] = rand(4, 64, dtype=torch.float32)
            out[f"{p}.attn.indexer.compressor.norm.weight"] = rand(64)
        out[f"{p}.ffn.gate.weight"] = rand(e, h)
        if n is not None and n < TINY["hash_layers"]:
            out[f"{p}.ffn.gate.tid2eid"] = torch.randint(0, e, (v, 2), generator=g, dtype=torch.int64)
        else:
            out[f"{p}.ffn.gate.bias"] = rand(e, dtype=torch.float32)
        for x in range(e):
            mxfp4(f"{p}.ffn.experts.{x}.w1", inter, h)
            mxfp4(f"{p}.ffn.experts.{x}.w2", h, inter)
            mxfp4(f"{p}.ffn.experts.{x}.w3", inter, h)
        fp8(f"{p}.ffn.shared_experts.w1", inter, h)
        fp8(f"{p}.ffn.shared_experts.w2", h, inter)
        fp8(f"{p}.ffn.shared_experts.w3", inter, h)
        out[f"{p}.attn_norm.weight"] = rand(h)
        out[f"{p}.ffn_norm.weight"] = rand(h)
        for hc in ("attn", "ffn"):
            out[f"{p}.hc_{hc}_fn"] = rand(24, 4 * h, dtype=torch.float32)
            out[f"{p}.hc_{hc}_base"] = rand(24, dtype=torch.float32)
            out[f"{p}.hc_{hc}_scale"] = rand(3, dtype=torch.float32)
        if p.startswith("mtp"):
            fp8(f"{p}.e_proj", h, h)
            fp8(f"{p}.h_proj", h, h)
            for nm in ("enorm", "hnorm", "norm"):
                out[f"{p}.{nm}.weight"] = rand(h)
    return out


def build_tiny_checkpoint(out_dir: str | os.PathLike, layout: str = "release", seed: int = 0) -> Path:
    """A 2-layer (+MTP) DeepSeek V4-shaped checkpoint in 3 shards with index and config.json.

    layout="release": FP8 block weights with UE8M0 .scale, MXFP4 experts (I8 + UE8M0 .scale), built with
    pipeline.formats; layout="bf16": the same keys' weights in BF16 and no scales.
    """
    if layout not in ("release", "bf16"):
        raise ValueError(f"layout must be 'release' or 'bf16'; got {layout!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = _tiny_tensors(layout, seed)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key in sorted(tensors):
        i = (
            1
            if key.startswith("layers.0.") or key == "embed.weight"
            else 2
            if key.startswith("layers.")
            else 3
        )
        groups.setdefault(f"model-{i:05d}-of-00003.safetensors", {})[key] = tensors[key]
    weight_map = {}
    for name, group in sorted(groups.items()):
        save_file(group, out / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2))
    config = tiny_config()
    if layout == "bf16":
        config.pop("quantization_config")
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    return out


def tree_digest(path: str | os.PathLike) -> dict[str, str]:
    """{relative file name: sha256 of (size, data extents)} for every file under ``path``.

    Holes read as zeros, so hashing each data extent with its offset (found with SEEK_DATA/SEEK_HOLE)
    identifies the content of a sparse file as surely as hashing all of it, at the cost of its data
    only: the 805 GiB replica digests in well under a second.
    """
    root = Path(path)
    out: dict[str, str] = {}
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h = hashlib.sha256()
        size = p.stat().st_size
        h.update(size.to_bytes(8, "little"))
        with p.open("rb") as f:
            fd, pos = f.fileno(), 0
            while pos < size:
                try:
                    start = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError:
                    break
                end = os.lseek(fd, start, os.SEEK_HOLE)
                # Chunks aligned to absolute offsets, all-zero ones skipped: zeros written explicitly hash
                # like a hole, so the digest depends on the bytes only, not on how the file is laid out.
                start -= start % _CHUNK
                f.seek(start)
                for off in range(start, end, _CHUNK):
                    chunk = f.read(min(_CHUNK, end - off))
                    if chunk.count(0) != len(chunk):
                        h.update(off.to_bytes(8, "little") + chunk)
                pos = end
        out[str(p.relative_to(root))] = h.hexdigest()
    return out
