"""How many routed experts of a release transcode to NVFP4 exactly, judged from their UE8M0 scale
tensors alone: the report `dsv4 transcode-scan` prints (pipeline/cli/transcode_scan.py says what it
reads and why the figure is a lower bound). A group is an expert's w1 and w3 together (one
weight_scale_2 for the fused w13) or its w2; it is exact when its block exponents span at most WINDOW
octaves (pipeline/formats/transcode.py).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import torch

from pipeline.checkpoint import Checkpoint, read_tensor
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
