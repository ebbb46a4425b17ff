"""The whole pipeline on the built-in micro DeepSeek V4 (`dsv4 e2e`, the README's main job): build a
deterministic tiny checkpoint in the release layout and validate it; the one-GPU path (calibrate layer by
layer from the release, convert the release with the amax) for each recipe; the BF16 path (dequantize,
quantize the BF16 copy with real ModelOpt, convert the export), checked to write the same bytes; then
score what vLLM would compute with (harness/vllm_view.py) against the BF16 model, one printed line per
step. What transformers and ModelOpt print goes to WORK.log, beside the workdir, so that it outlives a
temporary one.
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
    print(f"  {name:<56} {now - start:6.1f} s  {detail}", file=terminal_stdout(), flush=True)
    return now


def _require_valid(ckpt: Path) -> ValidationReport:
    from pipeline.checkpoint import validate_checkpoint

    report = validate_checkpoint(ckpt, full_scales=True)
    if not report.ok:
        raise DsV4Error("\n".join(str(p) for p in report.problems))
    return report


def log_path_for(work: Path) -> Path:
    return work.with_name(work.name + ".log")


def run_e2e(work: Path, preset: str, seed: int, bf16_path: bool = True) -> dict[str, dict]:
    """Every step in ``work``; returns {run name: KL and top-1 agreement against the BF16 model}."""
    with third_party_output(log_path_for(work)):
        return _run_e2e(work, preset, seed, bf16_path)


# (name, calibration recipe, convert options): transcode reuses the experts recipe's calibration
RUNS = (
    ("experts", "experts", {}),
    ("transcode", "experts", {"experts": "transcode"}),
    ("full", "full", {}),
)


def _run_e2e(work: Path, preset: str, seed: int, bf16_path: bool) -> dict[str, dict]:
    from harness.reference import compare, load_reference, logits, reference_batch
    from harness.tiny import build_tiny_release
    from harness.vllm_view import effective_weights, write_effective_checkpoint
    from pipeline.calibrate import CalibrateOptions, calibrate_release
    from pipeline.convert import convert_checkpoint
    from pipeline.dequant import dequantize_checkpoint

    t = time.perf_counter()
    release = build_tiny_release(work / "release", preset, seed)
    t = _step("build release checkpoint", t, str(release))
    report = _require_valid(release)
    t = _step("dsv4 validate", t, f"{report.tensors} tensors, layout {report.layout}")
    # the one-GPU path: calibrate layer by layer from the release, convert straight from it
    scores = {}
    for name, recipe, options in RUNS:
        amax = work / f"amax-{recipe}.safetensors"
        if not amax.exists():
            cal = calibrate_release(release, amax, CalibrateOptions(recipe=recipe, progress=False))
            t = _step(
                f"dsv4 calibrate --recipe {recipe}", t, f"{cal.amax_keys} amax, layer by layer -> {amax.name}"
            )
        conv = convert_checkpoint(
            release, work / f"vllm-{name}", amax=amax, recipe=recipe, progress=False, **options
        )
        flags = f" --recipe {recipe}" + (
            " --experts transcode" if options.get("experts") == "transcode" else ""
        )
        t = _step(f"dsv4 convert --amax{flags}", t, f"{len(conv.plan.layout)} tensors -> {conv.out_dir}")
        _require_valid(conv.out_dir)
    # the reference the scores compare with: the BF16 model (dsv4 dequant's copy, which the one-GPU path
    # itself never needs)
    bf16 = dequantize_checkpoint(release, work / "bf16", progress=False).out_dir
    t = _step("dsv4 dequant (the scores' BF16 reference)", t, str(bf16))
    if bf16_path:
        t = _bf16_path(work, release, bf16, t)
    base, _ = load_reference(bf16)
    tokens = reference_batch(base.config.vocab_size, seed=0, batch=4, seq=64)
    ref = logits(base, tokens)
    for name, _, _ in RUNS:
        view = effective_weights(work / f"vllm-{name}")
        model, _ = load_reference(write_effective_checkpoint(view, work / f"scored-{name}"))
        scores[name] = compare(logits(model, tokens), ref)
        t = _step(f"score {name}", t, f"KL {scores[name]['kl']:.4f}, top-1 {scores[name]['top1']:.3f}")
    return scores


def _bf16_path(work: Path, release: Path, bf16: Path, t: float) -> float:
    """The seeds' path (BF16 copy, whole-model ModelOpt calibration and export, convert), run beside the
    one-GPU path and compared with it byte for byte: the two must write the same checkpoint."""
    from harness.checkpoints import PATH_SPECIFIC_FILES, differing_files
    from pipeline.convert import convert_checkpoint
    from pipeline.quantize import QuantizeOptions, quantize_checkpoint

    for name, recipe, options in RUNS:
        export = work / f"nvfp4-{recipe}"
        if not export.exists():
            q = quantize_checkpoint(bf16, export, QuantizeOptions(recipe=recipe))
            t = _step(
                f"dsv4 quantize --recipe {recipe}",
                t,
                f"{q.quantizers['weight']} weight quantizers -> {export}",
            )
        graft = {"graft_from": release} if recipe == "experts" else {}
        out = work / f"bf16-path-vllm-{name}"
        convert_checkpoint(export, out, progress=False, **graft, **options)
        differ = differing_files(work / f"vllm-{name}", out, ignore=PATH_SPECIFIC_FILES)
        if differ:
            raise DsV4Error(
                f"{out}: the BF16 path wrote other bytes than the one-GPU path ({work / f'vllm-{name}'}) in "
                f"{', '.join(sorted(differ))}"
            )
        flags = (" --graft-from" if graft else "") + (
            " --experts transcode" if options.get("experts") == "transcode" else ""
        )
        t = _step(f"dsv4 convert{flags}", t, f"the same bytes as the one-GPU path's vllm-{name}")
    return t
