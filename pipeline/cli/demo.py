"""`dsv4 demo`: every format conversion on one realistic expert tensor (pipeline/demo.py), as a table."""

from __future__ import annotations

import argparse
import dataclasses
import json

from pipeline.cli.options import add_json, command_parser
from pipeline.errors import DsV4Error

SUMMARY = "run every format conversion on a realistic expert tensor and print a table"

DESCRIPTION = """\
Every format conversion of the pipeline on one realistic routed-expert tensor: each row is one
conversion a pipeline step performs, with the error it adds and whether it is exact. Needs nothing but
torch and runs in seconds; `dsv4 e2e` runs the pipeline itself on a tiny model.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = command_parser(subparsers, __name__, SUMMARY, DESCRIPTION)
    p.add_argument("--rows", type=int, default=3072, metavar="N", help="output features, as V4 Pro's w1")
    p.add_argument("--cols", type=int, default=7168, metavar="N", help="input features, a multiple of 32")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="random seed of the synthetic weight")
    add_json(p, "the rows")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.demo import format_table, run_demo

    if args.cols % 32 or args.rows <= 0 or args.cols <= 0:
        raise DsV4Error(f"--cols must be a positive multiple of 32 (the MXFP4 block); got {args.cols}")
    rows = run_demo(args.rows, args.cols, args.seed)
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in rows], indent=2))
    else:
        print(format_table(rows, (args.rows, args.cols)), end="")
    return 0
