"""`dsv4 dequant` throughput against `cp` of the same shard on the same disk, from one run.

    python bench/dequant.py [--workdir DIR] [--gib 2] [--workers N] [--device cpu|cuda] [--keep]

Builds a synthetic release-layout shard of about --gib GiB with the release's byte mix (MXFP4 routed
experts ~96 %, FP8 attention/shared experts, a little BF16/F32), copies it with `cp`, then dequantizes
it with the same code `dsv4 dequant` runs, and prints both rates and their ratio (cp seconds / dequant
seconds: 1.0 means dequant keeps up with copying the input). Dequant writes about 3.8x the bytes it
reads (4-bit experts become BF16), so the ratio is bounded by the disk's write speed too: the output
rate is printed beside it. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.dequant import dequantize_checkpoint
from pipeline.release_layout import FP8, MXFP4, WeightSpec

EXPERT_BYTES = 3072 * 3584 + 3072 * 224  # one w1 (I8 + UE8M0)


def synthetic_release_shard(out: Path, gib: float, seed: int = 0) -> Path:
    """Release-layout tensors with V4 Pro shapes, random codes and realistic scale exponents."""
    gen = torch.Generator().manual_seed(seed)
    weights = [
        WeightSpec("layers.0.attn.wq_b", FP8, (65536, 1536)),
        WeightSpec("layers.0.attn.wo_b", FP8, (7168, 16384)),
        WeightSpec("layers.0.ffn.shared_experts.w1", FP8, (3072, 7168)),
        WeightSpec("layers.0.attn.compressor.wkv.weight", "plain", (512, 7168)),
        WeightSpec("layers.0.ffn.gate.bias", "plain", (384,), "F32"),
    ]
    n_experts = max(1, int(gib * 1024**3 * 0.96 / (3 * EXPERT_BYTES)))
    for e in range(n_experts):
        weights += [
            WeightSpec(f"layers.0.ffn.experts.{e}.w1", MXFP4, (3072, 7168)),
            WeightSpec(f"layers.0.ffn.experts.{e}.w2", MXFP4, (7168, 3072)),
            WeightSpec(f"layers.0.ffn.experts.{e}.w3", MXFP4, (3072, 7168)),
        ]
    tensors = {}
    for w in weights:
        for t in w.tensors():
            if t.dtype == "F8_E8M0":
                tensors[t.key] = torch.randint(115, 125, t.shape, generator=gen, dtype=torch.uint8).view(
                    torch.float8_e8m0fnu
                )
            elif t.dtype == "F8_E4M3":
                tensors[t.key] = (torch.randn(t.shape, generator=gen) * 100).to(torch.float8_e4m3fn)
            elif t.dtype == "I8":
                tensors[t.key] = torch.randint(-128, 128, t.shape, generator=gen, dtype=torch.int8)
            elif t.dtype == "F32":
                tensors[t.key] = torch.randn(t.shape, generator=gen)
            else:
                tensors[t.key] = torch.randn(t.shape, generator=gen).to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    name = "model-00001-of-00001.safetensors"
    save_file(tensors, out / name, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": dict.fromkeys(tensors, name)}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    config = {
        "model_type": "deepseek_v4",
        "num_hidden_layers": 1,
        "n_routed_experts": n_experts,
        "num_hash_layers": 0,
    }
    (out / "config.json").write_text(json.dumps(config))
    return out / name


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=None, help="where to build (default: a temp dir)")
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="dsv4-bench-dequant-"))
    try:
        shard = synthetic_release_shard(work / "src", args.gib)
        size = shard.stat().st_size
        subprocess.run(
            ["cat", str(shard)], stdout=subprocess.DEVNULL, check=True
        )  # same cache state for both
        start = time.perf_counter()
        subprocess.run(["cp", str(shard), str(work / "copy.safetensors")], check=True)
        subprocess.run(["sync", str(work / "copy.safetensors")], check=True)
        cp_s = time.perf_counter() - start
        (work / "copy.safetensors").unlink()
        start = time.perf_counter()
        result = dequantize_checkpoint(
            work / "src", work / "bf16", device=args.device, workers=args.workers, progress=False
        )
        subprocess.run(["sync", "-f", str(work / "bf16")], check=True)
        dq_s = time.perf_counter() - start
        written = result.written_bytes
        # The I/O floor: copying as many bytes as dequant wrote (its own output, so the same disk).
        start = time.perf_counter()
        subprocess.run(["cp", "-r", str(work / "bf16"), str(work / "bf16-copy")], check=True)
        subprocess.run(["sync", "-f", str(work / "bf16-copy")], check=True)
        cp_out_s = time.perf_counter() - start
        print(f"shard: {size / 1e9:.2f} GB ({result.counts[MXFP4]} MXFP4, {result.counts[FP8]} FP8 tensors)")
        print(f"cp of the input shard:   {cp_s:7.2f} s  {size / cp_s / 1e9:6.2f} GB/s")
        print(
            f"cp of dequant's output:  {cp_out_s:7.2f} s  {written / cp_out_s / 1e9:6.2f} GB/s ({written / 1e9:.2f} GB)"
        )
        print(
            f"dequant:                 {dq_s:7.2f} s  {size / dq_s / 1e9:6.2f} GB/s read, "
            f"{written / dq_s / 1e9:6.2f} GB/s written ({written / size:.1f}x the input; device={args.device}, "
            f"workers={args.workers})"
        )
        print(f"ratio vs cp of the input shard (cp time / dequant time): {cp_s / dq_s:.2f}")
        print(f"ratio vs cp of the same output bytes (the disk's floor):  {cp_out_s / dq_s:.2f}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
