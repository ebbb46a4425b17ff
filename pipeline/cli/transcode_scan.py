"""`dsv4 transcode-scan RELEASE`: how many routed experts would transcode to NVFP4 exactly
(pipeline/transcode_scan.py)."""

from __future__ import annotations

import argparse
import json

from pipeline.cli.options import add_json, command_parser

SUMMARY = "fraction of the release's experts that transcode to NVFP4 exactly (reads scales only)"

DESCRIPTION = """\
How many routed experts of the release would transcode to NVFP4 exactly (`dsv4 convert --experts
transcode`).

Reads headers and the experts' UE8M0 scale tensors only (1/16 of the expert bytes: about 49 GB on
V4 Pro, read once; --sample reads fewer). An expert's w1 and w3 share weight_scale_2 (vLLM keeps w1's
for the fused w13), so they are judged together; w2 alone. A group is exact when its block exponents
span at most 17 octaves (pipeline/formats/transcode.py). Without reading the codes, all-zero blocks
cannot be told apart, so every block counts: the figure is a lower bound on the exact fraction.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = command_parser(subparsers, __name__, SUMMARY, DESCRIPTION)
    p.add_argument("release", help="release checkpoint directory")
    p.add_argument(
        "--sample", type=int, metavar="N", help="scan this many expert groups, evenly spread, not all"
    )
    add_json(p, "the report")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.checkpoint import Layout, ensure_valid
    from pipeline.formats.transcode import WINDOW
    from pipeline.transcode_scan import scan

    ckpt = ensure_valid(args.release, expect=Layout.RELEASE, step="dsv4 transcode-scan")
    report = scan(ckpt, args.sample)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return 0
    print(
        f"transcode-scan: {report.exact} of {report.groups} expert groups ({100 * report.exact_fraction:.2f} %) "
        f"span at most {WINDOW} octaves and transcode exactly (a lower bound: all-zero blocks count)"
    )
    print("octaves spanned: " + ", ".join(f"{k}: {v}" for k, v in sorted(report.spreads.items())))
    if report.worst and report.worst[0][0] > WINDOW:
        print("widest: " + ", ".join(f"{n} ({s})" for s, n in report.worst if s > WINDOW))
    return 0
