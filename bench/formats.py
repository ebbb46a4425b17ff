"""Throughput of every pipeline/formats conversion at V4 Pro's expert and attention shapes.

    python bench/formats.py [--repeats N] [--device cpu|cuda]

GB/s counts the BF16 side of each conversion (elements x 2 bytes), so rows compare across formats.
The last column relates each to a same-run copy of that many bytes (torch clone), the floor any
conversion that touches every byte is measured against. Nothing here is asserted: it prints.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import formats as F
from pipeline.demo import realistic_expert

SHAPES = [(3072, 7168), (7168, 3072), (16384, 4096)]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(fn, repeats: int, device: str) -> float:
    fn()  # warm-up (allocator, lazy tables)
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_shape(rows: int, cols: int, repeats: int, dev: str) -> list[tuple[str, float, float]]:
    """(conversion, seconds, seconds of a same-size copy) for one shape."""
    w = realistic_expert(rows, cols, seed=0).to(dev)
    copy_s = measure(lambda: w.clone(), repeats, dev)
    mx, mxs = F.mxfp4_quantize(w)
    q8, s8 = F.fp8_block_quantize(w)
    p4, ws, ws2 = F.nvfp4_quantize(w)
    cases = [
        ("fp8_block_quantize (ue8m0)", lambda: F.fp8_block_quantize(w)),
        ("fp8_block_dequantize -> bf16", lambda: F.fp8_block_dequantize(q8, s8)),
        ("mxfp4_quantize", lambda: F.mxfp4_quantize(w)),
        ("mxfp4_dequantize -> bf16", lambda: F.mxfp4_dequantize(mx, mxs)),
        ("mxfp4_to_fp8_block", lambda: F.mxfp4_to_fp8_block(mx, mxs)),
        ("nvfp4_quantize", lambda: F.nvfp4_quantize(w)),
        ("nvfp4_dequantize -> bf16", lambda: F.nvfp4_dequantize(p4, ws, ws2)),
    ]
    results = [("copy (torch clone, reference)", copy_s, copy_s)]
    results += [(name, measure(fn, repeats, dev), copy_s) for name, fn in cases]
    return results


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    print(
        f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} "
        f"repeats={args.repeats} (median)"
    )
    print(f"{'shape':>13}  {'conversion':<34} {'ms':>8} {'GB/s':>7} {'vs copy':>8}")
    for rows, cols in SHAPES:
        bf16_bytes = rows * cols * 2
        for name, seconds, copy_s in bench_shape(rows, cols, args.repeats, args.device):
            print(
                f"{rows:>6}x{cols:<6}  {name:<34} {1000 * seconds:8.1f} {bf16_bytes / seconds / 1e9:7.2f} "
                f"{copy_s / seconds:8.3f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
