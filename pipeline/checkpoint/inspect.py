"""A readable summary of a checkpoint from its headers: tensors and bytes by dtype and by role, shards,
and what config.json says."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

from .layout import ROLES, classify_layout, role_of
from .reader import Checkpoint

_CONFIG_FIELDS = (
    "architectures",
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_nextn_predict_layers",
    "n_routed_experts",
    "n_shared_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "num_hash_layers",
    "vocab_size",
    "dtype",
    "torch_dtype",
)


def summarize(path: str | Path) -> dict:
    """Summary dict (JSON-serialisable) of the checkpoint at ``path``; DsV4Error if it cannot be opened."""
    ck = Checkpoint.open(path)
    by_dtype: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    by_role: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for key, t in ck.tensors.items():
        for table, name in ((by_dtype, t.dtype), (by_role, role_of(key))):
            table[name][0] += 1
            table[name][1] += t.nbytes
    role_order = [r for r, _ in ROLES] + ["other"]
    info = classify_layout(ck.tensors)
    config = ck.config or {}
    summary: dict = {
        "path": str(ck.root),
        "layout": info.layout.value,
        "layout_evidence": info.evidence,
        "shards": len(ck.shards),
        "tensors": len(ck.tensors),
        "bytes": ck.total_bytes,
        "file_bytes": sum(s.file_size for s in ck.shards.values()),
        "by_dtype": {
            d: {"tensors": n, "bytes": b} for d, (n, b) in sorted(by_dtype.items(), key=lambda x: -x[1][1])
        },
        "by_role": {
            r: {"tensors": by_role[r][0], "bytes": by_role[r][1]} for r in role_order if r in by_role
        },
        "config": None,
    }
    if ck.config is not None:
        cfg = {k: config[k] for k in _CONFIG_FIELDS if k in config}
        ratios = config.get("compress_ratios")
        if isinstance(ratios, list):
            cfg["compress_ratios"] = {"entries": len(ratios), "counts": dict(sorted(Counter(ratios).items()))}
        if "quantization_config" in config:
            cfg["quantization_config"] = config["quantization_config"]
        summary["config"] = cfg
    return summary


def _gib(n: int) -> str:
    return f"{n / 1024**3:10.2f} GiB"


def format_summary(s: dict) -> str:
    lines = [
        f"checkpoint  {s['path']}",
        f"layout      {s['layout']} ({s['layout_evidence']})",
        f"shards      {s['shards']}",
        f"tensors     {s['tensors']:,}   data {_gib(s['bytes']).strip()} ({s['bytes']:,} bytes)",
        "",
        f"{'by dtype':<16}{'tensors':>10}{'size':>16}",
    ]
    lines += [f"  {d:<14}{v['tensors']:>10,}{_gib(v['bytes']):>16}" for d, v in s["by_dtype"].items()]
    lines += ["", f"{'by role':<16}{'tensors':>10}{'size':>16}"]
    lines += [f"  {r:<14}{v['tensors']:>10,}{_gib(v['bytes']):>16}" for r, v in s["by_role"].items()]
    cfg = s.get("config")
    lines.append("")
    if cfg is None:
        lines.append("config.json: none")
    else:
        lines.append("config.json")
        for k, v in cfg.items():
            if k == "compress_ratios":
                counts = ", ".join(f"{r}: {n}" for r, n in v["counts"].items())
                v = f"{v['entries']} entries (ratio: count = {counts})"
            lines.append(f"  {k:<26}{v}")
    return "\n".join(lines)
