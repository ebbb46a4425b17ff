"""`dsv4 inspect PATH`: what a checkpoint holds, from its headers alone (pipeline/checkpoint/inspect.py)."""

from __future__ import annotations

import argparse
import json

from pipeline.cli.options import add_json, command_parser

SUMMARY = "summarize a checkpoint: tensors and bytes by dtype and role, shards, config"

DESCRIPTION = """\
Summarize a sharded safetensors checkpoint from its headers (no tensor data is read): its layout
(release FP8+MXFP4, BF16, NVFP4 export), the number of shards, tensors and bytes by dtype and by role
(attention, routed experts, shared experts, compressor, indexer, norms, hc, embed/head, mtp, ...), and
what config.json says (layers, experts, hash layers, compress ratios, quantization_config).
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = command_parser(subparsers, __name__, SUMMARY, DESCRIPTION)
    p.add_argument(
        "path", help="checkpoint directory, its model.safetensors.index.json, or one .safetensors file"
    )
    add_json(p, "the summary")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.checkpoint.inspect import format_summary, summarize

    s = summarize(args.path)
    print(json.dumps(s, indent=2) if args.json else format_summary(s))
    return 0
