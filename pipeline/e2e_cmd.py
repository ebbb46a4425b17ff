"""`dsv4 e2e`: the whole pipeline on the built-in micro DeepSeek V4, on this machine, in about a minute.

The README's main job. It builds a deterministic tiny checkpoint in the release layout (FP8 attention,
MXFP4 experts, hash/sliding/CSA/HCA layers, an MTP block), validates it, dequantizes it with `dsv4
dequant`, quantizes the BF16 copy with real ModelOpt for both recipes, converts each export into the
layout vLLM loads with `dsv4 convert` (the experts recipe grafted onto the release, as NVIDIA does), and
scores each converted checkpoint against the BF16 model: transformers' DeepseekV4ForCausalLM in float32
with the weights vLLM would compute with (harness/vllm_view.py: FP8 tiles dequantized, NVFP4 experts
with w1's global scale for the fused w13).
Needs the quant extras: pip install -c constraints.txt -e '.[quant]'.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from pipeline.errors import DsV4Error


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "e2e",
        help="the pipeline end to end on the built-in micro model (needs the quant extras)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--workdir", type=Path, help="keep every intermediate checkpoint here (default: a temp dir)"
    )
    p.add_argument(
        "--preset", default="micro", choices=["micro", "vllm-shaped"], help="tiny model (default: micro)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the tiny model's weights (default: 0)")
    p.set_defaults(func=_main)


def _step(name: str, start: float, detail: str) -> float:
    now = time.perf_counter()
    print(f"  {name:<46} {now - start:6.1f} s  {detail}", flush=True)
    return now


def _main(args: argparse.Namespace) -> int:
    import importlib.util

    missing = [m for m in ("modelopt", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise DsV4Error(
            f"dsv4 e2e needs {', '.join(missing)}: pip install -c constraints.txt -e '.[quant]' "
            "(or run `dsv4 demo`, which needs torch only)"
        )
    from harness.reference import compare, load_reference, logits, reference_batch
    from harness.tiny import build_tiny_release
    from harness.vllm_view import effective_weights, write_effective_checkpoint
    from pipeline.checkpoint import validate_checkpoint
    from pipeline.convert import convert_checkpoint
    from pipeline.dequant import dequantize_checkpoint
    from pipeline.quantize import QuantizeOptions, quantize_checkpoint

    work = args.workdir or Path(tempfile.mkdtemp(prefix="dsv4-e2e-"))
    if args.workdir and work.exists() and any(work.iterdir()):
        raise DsV4Error(f"{work}: not empty; pass a new --workdir")
    work.mkdir(parents=True, exist_ok=True)
    print(f"dsv4 e2e: {args.preset} model, seed {args.seed}, in {work}")
    t = time.perf_counter()
    release = build_tiny_release(work / "release", args.preset, args.seed)
    t = _step("build release checkpoint", t, str(release))
    report = validate_checkpoint(release, full_scales=True)
    if not report.ok:
        raise DsV4Error("\n".join(str(p) for p in report.problems))
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
        report = validate_checkpoint(conv.out_dir, full_scales=True)
        if not report.ok:
            raise DsV4Error("\n".join(str(p) for p in report.problems))
        view = effective_weights(conv.out_dir)
        model, _ = load_reference(write_effective_checkpoint(view, work / f"scored-{name}"))
        scores[name] = compare(logits(model, tokens), ref)
        t = _step(f"score {name}", t, f"KL {scores[name]['kl']:.4f}, top-1 {scores[name]['top1']:.3f}")
    print("\nrecipe     KL(BF16 || converted)  top-1 agreement   (4x64 tokens; weights as vLLM loads them)")
    for name, score in scores.items():
        print(f"{name:<10} {score['kl']:21.4f}  {score['top1']:15.3f}")
    if args.workdir:
        print(f"\nconverted checkpoints, ready for dsv4 serve: {work}/vllm-{{experts,transcode,full}}")
    else:
        print("\n(pass --workdir DIR to keep every checkpoint, the converted ones included)")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0
