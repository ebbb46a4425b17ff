"""`dsv4 dequant SRC DST`: the release checkpoint to BF16 (pipeline/dequant.py)."""

from __future__ import annotations

import argparse

from pipeline.cli.options import (
    add_streaming_options,
    command_parser,
    max_shard_bytes,
    streaming_step_arguments,
)

SUMMARY = "release checkpoint (FP8 + MXFP4) -> BF16, streaming and resumable"

DESCRIPTION = """\
Dequantize the DeepSeek V4 release (FP8 attention with UE8M0 tile scales, MXFP4 routed experts) to BF16.

The output keeps the release's key names; transformers 5.23 loads it as DeepseekV4ForCausalLM.
SRC is validated first (headers, index, scale siblings, sampled scales, config): a bad or wrong kind of
checkpoint stops the step before any work, naming the file and key. SRC is only ever read.

DST is written shard by shard under temporary names (renamed when complete); the index comes last.
A killed run continues with --resume and produces byte-identical output. Free disk space is checked
against the planned output before anything is written.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = command_parser(subparsers, __name__, SUMMARY, DESCRIPTION)
    p.add_argument("src", help="release checkpoint directory (with model.safetensors.index.json)")
    p.add_argument("dst", help="output directory (new or empty; see --resume/--overwrite)")
    add_streaming_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.checkpoint import Layout, ensure_valid
    from pipeline.dequant import STEP, dequantize_checkpoint, dry_run_table, plan_dequant

    if args.dry_run:
        ckpt = ensure_valid(args.src, expect=Layout.RELEASE, step=STEP, full_scales=args.full_scales)
        print(dry_run_table(plan_dequant(ckpt, max_shard_bytes(args)), args.dst))
        return 0
    print(dequantize_checkpoint(args.src, args.dst, **streaming_step_arguments(args)).summary())
    return 0
