"""The whole pipeline on the built-in micro DeepSeek V4 (`dsv4 e2e`, the README's main job): build a
deterministic tiny checkpoint in the release layout, validate, dequantize, quantize the BF16 copy with
real ModelOpt for each recipe, convert each export into the layout vLLM loads, and score what vLLM would
compute with (harness/vllm_view.py) against the BF16 model, one printed line per step. What transformers
and ModelOpt print goes to WORK.log, beside the workdir, so that it outlives a temporary one.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.console import terminal_stdout, third_party_output
from pipeline.errors import DsV4Error

if TYPE_CHECKING:
    from pipeline.checkpoint import ValidationReport


def require_quant_extras() -> None:
    missing = [m for m in ("modelopt", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise DsV4Error(
            f"dsv4 e2e needs {', '.join(missing)}: pip install -c constraints.txt -e '.[quant]' "
            "(or run `dsv4 demo`, which needs torch only)"
        )


def _step(name: str, start: float, detail: str) -> float:
    now = time.perf_counter()
    print(f"  {name:<46} {now - start:6.1f} s  {detail}", file=terminal_stdout(), flush=True)
    return now


def _require_valid(ckpt: Path) -> ValidationReport:
    from pipeline.checkpoint import validate_checkpoint

    report = validate_checkpoint(ckpt, full_scales=True)
    if not report.ok:
        raise DsV4Error("\n".join(str(p) for p in report.problems))
    return report


def log_path_for(work: Path) -> Path:
    return work.with_name(work.name + ".log")


def run_e2e(work: Path, preset: str, seed: int) -> dict[str, dict]:
    """Every step in ``work``; returns {run name: KL and top-1 agreement against the BF16 model}."""
    with third_party_output(log_path_for(work)):
        return _run_e2e(work, preset, seed)


def _run_e2e(work: Path, preset: str, seed: int) -> dict[str, dict]:
    from harness.reference import compare, load_reference, logits, reference_batch
    from harness.tiny import build_tiny_release
    from harness.vllm_view import effective_weights, write_effective_checkpoint
    from pipeline.convert import convert_checkpoint
    from pipeline.dequant import dequantize_checkpoint
    from pipeline.quantize import QuantizeOptions, quantize_checkpoint

    t = time.perf_counter()
    release = build_tiny_release(work / "release", preset, seed)
    t = _step("build release checkpoint", t, str(release))
    report = _require_valid(release)
    t = _step("dsv4 validate", t, f"{report.tensors} tensors, layout {report.layout}")
    bf16 = dequantize_checkpoint(release, work / "bf16", progress=False).out_dir
    t = _step("dsv4 dequant", t, str(bf16))
    base, _ = load_reference(bf16)
    tokens = reference_batch(base.config.vocab_size, seed=0, batch=4, seq=64)
    ref = logits(base, tokens)
    scores = {}
    # (name, ModelOpt recipe, convert options): transcode reuses the experts recipe's calibration
    runs = (
        ("experts", "experts", {"graft_from": release}),
        ("transcode", "experts", {"graft_from": release, "experts": "transcode"}),
        ("full", "full", {}),
    )
    for name, recipe, options in runs:
        export = work / f"nvfp4-{recipe}"
        if not export.exists():
            q = quantize_checkpoint(bf16, export, QuantizeOptions(recipe=recipe, calib_size=16, calib_seq=64))
            t = _step(
                f"dsv4 quantize --recipe {recipe}",
                t,
                f"{q.quantizers['weight']} weight quantizers -> {export}",
            )
        conv = convert_checkpoint(export, work / f"vllm-{name}", progress=False, **options)
        flags = (" --graft-from" if "graft_from" in options else "") + (
            " --experts transcode" if options.get("experts") == "transcode" else ""
        )
        t = _step(f"dsv4 convert{flags}", t, f"{len(conv.plan.layout)} tensors -> {conv.out_dir}")
        _require_valid(conv.out_dir)
        view = effective_weights(conv.out_dir)
        model, _ = load_reference(write_effective_checkpoint(view, work / f"scored-{name}"))
        scores[name] = compare(logits(model, tokens), ref)
        t = _step(f"score {name}", t, f"KL {scores[name]['kl']:.4f}, top-1 {scores[name]['top1']:.3f}")
    return scores
