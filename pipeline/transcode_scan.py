"""`dsv4 transcode-scan RELEASE`: how many routed experts would transcode to NVFP4 exactly.

Reads headers and the experts' UE8M0 scale tensors only (1/16 of the expert bytes: about 49 GB on
V4 Pro, read once; --sample reads fewer). An expert's w1 and w3 share weight_scale_2 (vLLM keeps w1's
for the fused w13), so they are judged together; w2 alone. A group is exact when its block exponents
span at most 17 octaves (pipeline/formats/transcode.py). Without reading the codes, all-zero blocks
cannot be told apart, so every block counts: the figure is a lower bound on the exact fraction.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch

from pipeline.checkpoint import Checkpoint, Layout, ensure_valid, read_tensor
from pipeline.checkpoint.validate import check_read_values
from pipeline.formats.transcode import WINDOW
from pipeline.release_layout import (
    MXFP4,
    ROUTED_EXPERT,
    WEIGHT_SUFFIX,
    routed_expert,
    scale_key,
    stored_format,
)


@dataclass
class ScanReport:
    groups: int = 0
    exact: int = 0
    spreads: Counter = field(default_factory=Counter)  # octaves spanned -> groups
    worst: list[tuple[int, str]] = field(default_factory=list)  # (spread, group), widest first

    @property
    def exact_fraction(self) -> float:
        return self.exact / self.groups if self.groups else 1.0

    def to_json(self) -> dict:
        d = asdict(self)
        d["spreads"] = {str(k): v for k, v in sorted(self.spreads.items())}
        d["exact_fraction"] = self.exact_fraction
        d["window_octaves"] = WINDOW
        return d


def expert_groups(ckpt: Checkpoint) -> dict[str, list[str]]:
    """{group name: [scale keys]}: `<block>.experts.<E>.w13` (w1 and w3) and `<block>.experts.<E>.w2`."""
    groups: dict[str, list[str]] = {}
    for key, info in ckpt.tensors.items():
        m = ROUTED_EXPERT.match(key.removesuffix(WEIGHT_SUFFIX)) if key.endswith(WEIGHT_SUFFIX) else None
        scale = ckpt.tensors.get(scale_key(key)) if m else None
        if m and stored_format(info.dtype, scale.dtype if scale else None) == MXFP4:
            name = routed_expert(m["block"], int(m["e"]), "w2" if m["w"] == "w2" else "w13")
            groups.setdefault(name, []).append(scale.key)
    return dict(sorted(groups.items()))


def scan(ckpt: Checkpoint, sample: int | None = None, keep_worst: int = 10) -> ScanReport:
    groups = expert_groups(ckpt)
    names = list(groups)
    if sample is not None and sample < len(names):
        stride = len(names) / sample
        names = [names[int(i * stride)] for i in range(sample)]
    report = ScanReport()
    for name in names:
        exps = []
        for k in groups[name]:
            scale = read_tensor(ckpt.tensors[k])
            check_read_values(ckpt.tensors[k], scale)  # UE8M0 0xFF is NaN: no octave count means anything
            exps.append(scale.view(torch.uint8))
        lo = min(int(e.min()) for e in exps)
        hi = max(int(e.max()) for e in exps)
        spread = hi - lo
        report.groups += 1
        report.exact += spread <= WINDOW
        report.spreads[spread] += 1
        report.worst.append((spread, name))
    report.worst = sorted(report.worst, reverse=True)[:keep_worst]
    return report


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "transcode-scan",
        help="fraction of the release's experts that transcode to NVFP4 exactly (reads scales only)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("release", help="release checkpoint directory")
    p.add_argument("--sample", type=int, help="scan this many expert groups, evenly spread (default: all)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
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
