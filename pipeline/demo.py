"""Every format conversion of the pipeline on one realistic routed-expert tensor: the rows `dsv4 demo`
prints (pipeline/cli/demo.py), each one conversion a pipeline step performs, with the error it adds and
whether it is exact. Also the synthetic expert weight the format tests and benchmarks share.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pipeline import formats as F


@dataclass
class Row:
    step: str
    output: str
    bytes: int
    bits_per_weight: float
    reference: str
    rel_error: float
    sqnr_db: float
    exact: bool
    seconds: float


def realistic_expert(rows: int, cols: int, seed: int) -> torch.Tensor:
    """A BF16 weight with trained-weight-like statistics: Gaussian bulk, heavy tails, per-row spread."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * 0.02
    w += torch.randn(rows, cols, generator=gen).pow(3) * 0.004
    w *= torch.exp(torch.randn(rows, 1, generator=gen) * 0.3)
    return w.to(torch.bfloat16)


def _compare(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, bool]:
    got, ref = got.double(), ref.double()
    noise = (got - ref).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    rel = (noise / signal) ** 0.5 if signal else 0.0
    sqnr = float("inf") if noise == 0 else 10 * torch.log10(torch.tensor(signal / noise)).item()
    return rel, sqnr, bool(torch.equal(got, ref))


def _timed(fn: Callable[[], tuple]) -> tuple[tuple, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def run_demo(rows: int = 3072, cols: int = 7168, seed: int = 0) -> list[Row]:
    source = realistic_expert(rows, cols, seed)
    n = source.numel()
    out: list[Row] = []

    def add(step, output, tensors, reference_name, reference, value, seconds):
        rel, sqnr, exact = _compare(value, reference)
        size = _nbytes(*tensors)
        out.append(Row(step, output, size, 8 * size / n, reference_name, rel, sqnr, exact, seconds))

    (packed, scale), t = _timed(lambda: F.mxfp4_quantize(source))
    release = F.mxfp4_dequantize(packed, scale, torch.float32)
    add(
        "BF16 -> MXFP4 (the release's expert format)",
        "MXFP4",
        (packed, scale),
        "BF16 source",
        source,
        release,
        t,
    )

    (bf16,), t = _timed(lambda: (F.mxfp4_dequantize(packed, scale, torch.bfloat16),))
    add("MXFP4 -> BF16 (dsv4 dequant)", "BF16", (bf16,), "release MXFP4", release, bf16, t)

    (q8, s8), t = _timed(lambda: F.mxfp4_to_fp8_block(packed, scale))
    fp8_values = F.fp8_block_dequantize(q8, s8, dtype=torch.float32)
    add(
        "MXFP4 -> FP8 block, UE8M0 tiles (re-encode)",
        "FP8",
        (q8, s8),
        "release MXFP4",
        release,
        fp8_values,
        t,
    )

    (tp, tws, tws2, _), t = _timed(lambda: F.mxfp4_to_nvfp4(packed, scale))
    transcoded = F.nvfp4_dequantize(tp, tws, tws2, torch.float32)
    add(
        "MXFP4 -> NVFP4 transcode (same codes)",
        "NVFP4",
        (tp, tws, tws2),
        "release MXFP4",
        release,
        transcoded,
        t,
    )

    (p4, ws, ws2), t = _timed(lambda: F.nvfp4_quantize(bf16))
    requant = F.nvfp4_dequantize(p4, ws, ws2, torch.float32)
    add(
        "MXFP4 -> BF16 -> NVFP4 (experts recipe)",
        "NVFP4",
        (p4, ws, ws2),
        "release MXFP4",
        release,
        requant,
        t,
    )

    (p4d, wsd, ws2d), t = _timed(lambda: F.nvfp4_quantize(source))
    direct = F.nvfp4_dequantize(p4d, wsd, ws2d, torch.float32)
    add("BF16 -> NVFP4 (ModelOpt 0.47 rule)", "NVFP4", (p4d, wsd, ws2d), "BF16 source", source, direct, t)

    (qf, sf), t = _timed(lambda: F.fp8_block_quantize(source))
    fp8_direct = F.fp8_block_dequantize(qf, sf, dtype=torch.float32)
    add("BF16 -> FP8 block, UE8M0 tiles", "FP8", (qf, sf), "BF16 source", source, fp8_direct, t)
    return out


def format_table(rows: list[Row], shape: tuple[int, int]) -> str:
    header = (
        f"Formats on one realistic routed-expert weight [{shape[0]}, {shape[1]}] (BF16 source, seeded)\n\n"
    )
    cols = ("step", "bytes", "bits/w", "vs", "rel. error", "SQNR dB", "exact", "ms")
    lines = [cols]
    for r in rows:
        sqnr = "inf" if r.sqnr_db == float("inf") else f"{r.sqnr_db:.1f}"
        lines.append(
            (
                r.step,
                f"{r.bytes:,}",
                f"{r.bits_per_weight:.2f}",
                r.reference,
                f"{100 * r.rel_error:.3f} %",
                sqnr,
                "yes" if r.exact else "no",
                f"{1000 * r.seconds:.0f}",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(cols))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    notes = (
        "\nrel. error: ||out - ref|| / ||ref|| over the whole tensor; exact: every element equal.\n"
        "Dequantizing the release, re-encoding it as FP8 and transcoding it to NVFP4 (same E2M1 codes,\n"
        "power-of-two scales) are exact; quantizing to NVFP4 from BF16 re-rounds every block.\n"
    )
    return header + "\n".join(text) + "\n" + notes
