"""`dsv4 quantize SRC DST`: BF16 checkpoint -> ModelOpt NVFP4 export, in this process
(pipeline/quantize.py) or through hf_ptq on the node (pipeline/hf_ptq_driver.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cli.options import add_device, command_parser
from pipeline.errors import DsV4Error

SUMMARY = "BF16 checkpoint -> NVFP4 export with ModelOpt (in-process, or hf_ptq on the node)"

DESCRIPTION = """\
Quantize a BF16 DeepSeek V4 checkpoint (the output of `dsv4 dequant`) to NVFP4 with NVIDIA ModelOpt,
in this process: calibration, NVIDIA's fallback for quantizers that saw no data, a snapshot of the
calibrated state, then ModelOpt's export under version-checked runtime patches.

Recipes:
  experts  routed experts only, NVFP4 W4A4 (NVIDIA's V4 recipe); everything else stays as released
  full     every linear layer NVFP4 W4A4 (what the seeds ran)

Writes DST (the export, renamed into place when complete, with dsv4-quantize-report.json) and
DST.calibration/ (amax snapshot and ModelOpt state). If the export fails, fix the cause and rerun with
--export-only: the calibrated state is reused. --validate-only checks that saved state and exits.
On the 8xB200 node, --driver hf_ptq --modelopt-repo REPO runs the same recipe through ModelOpt's own
examples/hf_ptq/hf_ptq.py (pipeline/hf_ptq/: its flag names, parse_args, __main__ conversions, every
attribute main() reads checked) under the same patches; --print-argv shows what it would run.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from pipeline.recipes import RECIPES

    p = command_parser(subparsers, __name__, SUMMARY, DESCRIPTION)
    p.add_argument("src", type=Path, help="BF16 checkpoint directory (from dsv4 dequant)")
    p.add_argument("dst", type=Path, help="export directory to create")
    p.add_argument("--recipe", choices=RECIPES, default="experts", help="what to quantize")
    p.add_argument(
        "--calib-file",
        type=Path,
        metavar="FILE",
        help=".jsonl with input_ids or text, or .txt one sample per line",
    )
    p.add_argument("--calib-size", type=int, default=16, metavar="N", help="calibration samples")
    p.add_argument("--calib-seq", type=int, default=64, metavar="N", help="tokens per sample")
    p.add_argument("--calib-batch", type=int, default=4, metavar="N", help="samples per forward")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the built-in calibration set")
    add_device(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    p.add_argument(
        "--driver",
        choices=("in-process", "hf_ptq"),
        default="in-process",
        help="in-process: mtq.quantize + export here (CPU or one GPU); hf_ptq: ModelOpt's own "
        "examples/hf_ptq/hf_ptq.py main() (the node), with its flag names, parse_args and __main__ "
        "conversions (pipeline/hf_ptq/) under the same runtime patches",
    )
    p.add_argument(
        "--modelopt-repo",
        type=Path,
        metavar="DIR",
        help="a Model-Optimizer checkout (hf_ptq driver; the wheel has no examples)",
    )
    p.add_argument("--tp", type=int, default=8, metavar="N", help="hf_ptq --inference_tensor_parallel")
    p.add_argument(
        "--print-argv",
        action="store_true",
        help="hf_ptq driver: parse and convert the arguments, print them, exit",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--export-only", action="store_true", help="skip calibration; export from DST.calibration/"
    )
    mode.add_argument(
        "--validate-only", action="store_true", help="check DST.calibration/ and exit (0 ok, 1 not)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.quantize import QuantizeOptions, quantize_checkpoint, state_dir_for, validate_state
    from pipeline.quantize_checks import REPORT_NAME, check_destination, require_quant_env

    if args.validate_only:
        ok, summary = validate_state(state_dir_for(args.dst))
        print(summary)
        return 0 if ok else 1
    if args.driver == "hf_ptq":
        return _hf_ptq(args)
    check_destination(args.dst)
    require_quant_env()
    opts = QuantizeOptions(
        recipe=args.recipe,
        calib_file=args.calib_file,
        calib_size=args.calib_size,
        calib_seq=args.calib_seq,
        calib_batch=args.calib_batch,
        seed=args.seed,
        device=args.device,
        export_only=args.export_only,
        overwrite=args.overwrite,
    )
    report = quantize_checkpoint(args.src, args.dst, opts)
    fallbacks = f", {len(report.uncalibrated)} quantizer(s) given the fallback" if report.uncalibrated else ""
    clamped = (
        f", {len(report.clamped_activation_scales)} activation scale(s) clamped"
        if report.clamped_activation_scales
        else ""
    )
    print(
        f"quantize: {args.dst} ({report.recipe}): {report.quantizers['weight']} weight and "
        f"{report.quantizers['input']} input quantizers{fallbacks}{clamped}; patches reached: "
        + ", ".join(f"{p['name']} x{p['calls']}" for p in report.patches)
        + f"; {report.seconds:.1f} s; report: {args.dst / REPORT_NAME}"
    )
    return 0


def _hf_ptq(args: argparse.Namespace) -> int:
    """The node's driver: the arguments checked and converted here, the run in pipeline/hf_ptq_driver.py."""
    from pipeline import hf_ptq

    if args.modelopt_repo is None:
        raise DsV4Error(
            "--driver hf_ptq needs --modelopt-repo (a Model-Optimizer checkout: the wheel has no examples)"
        )
    if args.export_only:
        raise DsV4Error(
            "--export-only is the in-process driver's recovery mode; hf_ptq has its own checkpoints"
        )
    cfg = hf_ptq.config_for_recipe(
        args.recipe,
        str(args.src),
        str(args.dst),
        calib_size=args.calib_size,
        calib_seq=args.calib_seq,
        batch_size=args.calib_batch,
        calib_file=str(args.calib_file) if args.calib_file else None,
        tensor_parallel=args.tp,
    )
    if args.print_argv:
        _, parsed, argv = hf_ptq.prepare(cfg, args.modelopt_repo)
        print("hf_ptq.py " + " ".join(argv))
        print("after parse_args and the __main__ conversions:")
        for key, value in sorted(vars(parsed).items()):
            print(f"  {key} = {value!r}")
        return 0
    from pipeline.hf_ptq_driver import run_hf_ptq

    reached = run_hf_ptq(cfg, args.src, args.dst, args.modelopt_repo, overwrite=args.overwrite)
    print(
        f"quantize (hf_ptq): {args.dst} ({args.recipe} -> --qformat {cfg.qformat}); patches reached: {reached}"
    )
    return 0
