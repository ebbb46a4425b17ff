"""`dsv4 inspect PATH`: what a checkpoint holds, from its headers alone."""

from __future__ import annotations

import argparse
import json

from pipeline.checkpoint.inspect import format_summary, summarize

HELP = "summarize a checkpoint: tensors and bytes by dtype and role, shards, config"
DESCRIPTION = """\
Summarize a sharded safetensors checkpoint from its headers (no tensor data is read): its layout
(release FP8+MXFP4, BF16, NVFP4 export), the number of shards, tensors and bytes by dtype and by role
(attention, routed experts, shared experts, compressor, indexer, norms, hc, embed/head, mtp, ...), and
what config.json says (layers, experts, hash layers, compress ratios, quantization_config).
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "inspect", help=HELP, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "path", help="checkpoint directory, its model.safetensors.index.json, or one .safetensors file"
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    s = summarize(args.path)
    print(json.dumps(s, indent=2) if args.json else format_summary(s))
    return 0
