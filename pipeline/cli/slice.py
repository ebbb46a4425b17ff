"""`dsv4 slice RELEASE OUT --layers 2 --experts 8`: a small release-layout checkpoint cut out of the
release (pipeline/slice/)."""

from __future__ import annotations

import argparse

from pipeline.cli.options import (
    add_streaming_options,
    command_parser,
    max_shard_bytes,
    streaming_step_arguments,
)
from pipeline.errors import DsV4Error

SUMMARY = "a few layers and experts of the release, in the release layout (the node's canary)"

DESCRIPTION = """\
Cut a small checkpoint out of the DeepSeek V4 release, in the release layout (FP8 attention with UE8M0
tiles, MXFP4 experts), for a canary run of every later step on the real kernels: some layers, the first
E routed experts of each, everything else byte for byte, config.json rewritten to match.

--layers N keeps N layers covering the block kinds ({kinds}; that priority), earliest
first; --layers 0,3 names them. Kept layers are renumbered in order. Router rows and biases keep the
first E experts; hash layers' tid2eid ids are remapped below E (kept where already below E, otherwise
the next free expert from id mod E; distinct per token): routing changes, so the slice tests kernels and
loading, not accuracy. dsv4-slice-report.json beside the output records what was kept.

RELEASE is validated first and only read; OUT is written shard by shard under temporary names, the index
last (--resume continues a killed run), then validated.
"""


def _layers(text: str) -> int | tuple[int, ...]:
    from pipeline.slice.selection import parse_layers

    try:
        return parse_layers(text)
    except DsV4Error as err:  # argparse reports an ArgumentTypeError as a usage error, exit 2
        raise argparse.ArgumentTypeError(str(err)) from None


def register(subparsers: argparse._SubParsersAction) -> None:
    from pipeline.slice.selection import DEFAULT_EXPERTS, DEFAULT_LAYERS, KINDS

    p = command_parser(subparsers, __name__, SUMMARY, DESCRIPTION.format(kinds=", ".join(KINDS)))
    p.add_argument("src", help="release checkpoint directory")
    p.add_argument("dst", help="output directory (new or empty; see --resume/--overwrite)")
    p.add_argument(
        "--layers",
        type=_layers,
        metavar="N|LIST",
        default=DEFAULT_LAYERS,
        help="a count or comma-separated layer numbers (e.g. 0,3; one layer: 5,)",
    )
    p.add_argument(
        "--experts",
        type=int,
        default=DEFAULT_EXPERTS,
        metavar="E",
        help="routed experts to keep per layer, the first E",
    )
    add_streaming_options(p, compute=False)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.checkpoint import Layout, ensure_valid
    from pipeline.slice import STEP, dry_run_table, plan_slice, slice_checkpoint

    if args.dry_run:
        ckpt = ensure_valid(args.src, expect=Layout.RELEASE, step=STEP, full_scales=args.full_scales)
        plan = plan_slice(ckpt, args.layers, args.experts, max_shard_bytes(args))
        print(dry_run_table(plan, args.dst))
        return 0
    kept = dict(layers=args.layers, experts=args.experts)
    print(slice_checkpoint(args.src, args.dst, **kept, **streaming_step_arguments(args)).summary())
    return 0
