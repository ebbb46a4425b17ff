"""What `dsv4 convert` prints about a plan: the rule table (output tensors by source, rename rule and
action, and the export keys dropped) and the dry-run table."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from pipeline.checkpoint.folder import free_disk

from .plan import ConvertPlan


def rule_table(plan: ConvertPlan) -> str:
    rows = sorted(plan.counts().items())
    width = max((len(r) for (_, r, _), _ in rows), default=4)
    act = max([24, *(len(a) for (_, _, a), _ in rows)])
    lines = [f"  {'source':<8} {'rule':<{width}}  {'action':<{act}} tensors"]
    lines += [f"  {s:<8} {r:<{width}}  {a:<{act}} {n:>7}" for (s, r, a), n in rows]
    drops = Counter(why for _, why in plan.dropped)
    lines += [f"  dropped  {n:>5} export key(s): {why}" for why, n in sorted(drops.items())]
    return "\n".join(lines)


def dry_run_table(plan: ConvertPlan, dst: str | Path) -> str:
    probe, free = free_disk(dst)
    output = plan.output()
    source = (
        f"{plan.release} + a {plan.amax['format']} amax file (recipe {plan.amax['recipe']}, experts "
        f"{plan.amax['experts']})"
        if plan.amax
        else f"{plan.export} (dialect {plan.dialect})"
        + (f" + graft from {plan.release}" if plan.release else "")
    )
    lines = [
        f"convert plan: {source} -> {dst}",
        rule_table(plan),
        f"  read {plan.read_bytes / 1e9:.2f} GB; output {len(output.shards)} shard(s), "
        f"{output.total_bytes / 1e9:.2f} GB; {free / 1e9:.2f} GB free at {probe}",
    ]
    if plan.omitted:
        lines.append(
            f"  not written: {len(plan.omitted)} tensor(s), e.g. {plan.omitted[0][0]}: {plan.omitted[0][1]}"
        )
    for c in plan.config_changes:
        lines.append(f"  config: {c.key}: {c.rule}")
    return "\n".join(lines)


__all__ = ["dry_run_table", "rule_table"]
