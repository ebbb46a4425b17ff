"""`dsv4 validate PATH`: check a checkpoint the way every step does before its long work
(pipeline/checkpoint/validate.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.cli.options import add_full_scales, add_json, command_parser
from pipeline.errors import DsV4Error

SUMMARY = "check a checkpoint's shards, index, scales and config (exit 1 if invalid)"

DESCRIPTION = """\
Check a sharded safetensors checkpoint without loading it:

  * shards, index and config.json are regular files (a FIFO is refused, never opened);
  * every index entry names a shard in the checkpoint's top folder (no absolute path, no .., no
    subfolder: vLLM only looks there) that exists and holds it; no key in two shards;
  * each shard's header agrees with its file size (truncated shards), header JSON parses, no key
    appears twice in it;
  * every quantized weight has its scale siblings with the right dtype and shape
    (FP8 .scale per 128x128 tile, MXFP4 .scale per 32 inputs, NVFP4 .weight_scale per 16 inputs,
    .weight_scale_2 and .input_scale F32 scalars);
  * scales are finite and positive (a deterministic sample; all with --full-scales);
  * config.json agrees with the tensors (layers, experts, hash layers, compress_ratios; FP8/MXFP4
    tensors need the release's quantization_config, quant_method fp8; NVFP4 tensors one of ModelOpt's
    or the mixed layout's, if any).

All problems are listed, each with its file and key. Exit status: 0 valid, 1 invalid, 2 unusable input.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from pipeline.checkpoint.layout import Layout

    p = command_parser(subparsers, __name__, SUMMARY, DESCRIPTION)
    p.add_argument(
        "path", help="checkpoint directory, its model.safetensors.index.json, or one .safetensors file"
    )
    add_full_scales(p)
    p.add_argument(
        "--expect",
        choices=[lay.value for lay in Layout if lay is not Layout.UNKNOWN],
        help="also fail unless the checkpoint has this layout",
    )
    add_json(p, "the report")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.checkpoint.layout import Layout
    from pipeline.checkpoint.validate import validate_checkpoint

    if not Path(args.path).exists():
        raise DsV4Error(f"{args.path}: no such file or directory")
    expect = Layout(args.expect) if args.expect else None
    report = validate_checkpoint(
        args.path, full_scales=args.full_scales, expect=expect, step=f"--expect {args.expect}"
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0 if report.ok else 1
    for p in report.problems:
        print(f"problem: {p}")
    status = "valid" if report.ok else f"INVALID ({len(report.problems)} problem(s))"
    print(
        f"{report.path}: {status}; layout {report.layout}; {report.shards} shard(s), "
        f"{report.tensors:,} tensors, {report.tensor_bytes / 1024**3:.2f} GiB; "
        f"scales checked {report.scales_checked}/{report.scales_total}; {report.seconds:.2f} s"
    )
    return 0 if report.ok else 1
