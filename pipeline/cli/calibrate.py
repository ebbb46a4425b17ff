"""`dsv4 calibrate RELEASE AMAX`: ModelOpt calibration one decoder layer at a time, straight from the
release, to one amax file (pipeline/calibrate/)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cli.options import add_device, command_parser

SUMMARY = "release -> amax of every quantizer, one layer at a time on one device (no BF16 copy)"

DESCRIPTION = """\
Calibrate the DeepSeek V4 release with NVIDIA ModelOpt one decoder layer at a time: the model is built
on the meta device, layer 0's inputs are captured from the embedding, then each layer is read from the
release, dequantized in memory (as `dsv4 dequant` does), run over every calibration batch with the
recipe's quantizers calibrating, and freed; its outputs feed the next layer. Peak memory is one layer
plus the activations, never the model, and no BF16 copy is written.

AMAX is one .safetensors file with exactly the keys and values of the calibration snapshot `dsv4
quantize` keeps (DST.calibration/amax.safetensors): the same batches give the same amax, bit for bit,
as calibrating the whole BF16 model. What made it (recipe, calibration data, versions) is in its header.

Recipes:
  experts  routed experts only, NVFP4 W4A4 (NVIDIA's V4 recipe)
  full     every linear layer NVFP4 W4A4 (what the seeds ran)

The MTP block is not calibrated: transformers' DeepseekV4ForCausalLM has no MTP module, so whole-model
calibration (dsv4 quantize, hf_ptq) records no MTP amax either.

A killed run resumes: rerun the same command. Finished layers are kept in .AMAX.work/ beside AMAX and
the result is byte-identical to an uninterrupted run; a work folder of other inputs or options is
refused (--restart discards it). Output of transformers and ModelOpt goes to AMAX.log.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from pipeline.recipes import RECIPES

    p = command_parser(subparsers, __name__, SUMMARY, DESCRIPTION)
    p.add_argument("release", type=Path, help="release checkpoint directory (FP8 + MXFP4, as published)")
    p.add_argument("amax", type=Path, help="the .safetensors file to write (outside the release)")
    p.add_argument("--recipe", choices=RECIPES, default="experts", help="which quantizers to calibrate")
    p.add_argument(
        "--calib",
        type=Path,
        metavar="FILE",
        help=".jsonl with input_ids or text, or .txt one sample per line; without it, the built-in "
        "seeded token ids dsv4 quantize uses",
    )
    p.add_argument("--samples", type=int, default=16, metavar="N", help="calibration samples")
    p.add_argument("--seq-len", type=int, default=64, metavar="L", help="tokens per sample")
    p.add_argument("--batch", type=int, default=4, metavar="B", help="samples per forward")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the built-in calibration set")
    add_device(p)
    p.add_argument("--overwrite", action="store_true", help="replace an AMAX file dsv4 calibrate wrote")
    p.add_argument(
        "--restart",
        action="store_true",
        help="discard the work folder an interrupted run left (instead of resuming it)",
    )
    p.add_argument("--quiet", action="store_true", help="no per-layer lines (the summary is still printed)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.calibrate import CalibrateOptions, calibrate_release
    from pipeline.quantize_checks import require_quant_env

    require_quant_env("dsv4 calibrate")
    opts = CalibrateOptions(
        recipe=args.recipe,
        calib_file=args.calib,
        samples=args.samples,
        seq_len=args.seq_len,
        batch=args.batch,
        seed=args.seed,
        device=args.device,
        overwrite=args.overwrite,
        restart=args.restart,
        progress=not args.quiet,
    )
    report = calibrate_release(args.release, args.amax, opts)
    kept = f", {report.kept_layers} kept from the interrupted run" if report.kept_layers else ""
    fallbacks = f", {len(report.fallbacks)} given the fallback" if report.fallbacks else ""
    print(
        f"calibrate: {args.amax} ({report.recipe}): {report.amax_keys} amax from {report.total_layers} layers"
        f"{kept}{fallbacks}; {report.calibration['samples']} samples x {report.calibration['seq_len']} tokens "
        f"on {report.device}; MTP not calibrated (as whole-model calibration); {report.seconds:.1f} s"
    )
    return 0
