"""A checkpoint's config.json and hf_quant_config.json on disk: read them, plan the vLLM rewrite
(this package's rules), and write it, keeping the originals as .orig. What `dsv4 fix-config` and
`dsv4 use-plugin` do to a checkpoint folder; the rules themselves only ever see dicts.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.checkpoint.reader import CONFIG_NAME, INDEX_NAME, read_header, read_index, read_json_object
from pipeline.checkpoint.writer import copy_file_atomic, write_json_atomic
from pipeline.errors import DsV4Error

from .engine import HF_QUANT_CONFIG, FixResult
from .fix import fix_config
from .targets import DEFAULT_TARGET

BACKUP_SUFFIX = ".orig"


def _load_json(path: Path, what: str) -> dict:
    if not os.path.lexists(path):
        raise DsV4Error(f"{path}: no {what} there")
    return read_json_object(path)  # refuses anything but a regular file (a FIFO would hang the read)


def tensor_keys(ckpt: Path) -> list[str] | None:
    """Every tensor key, from the index or a single shard's header; None if the directory has neither."""
    index = ckpt / INDEX_NAME
    if os.path.lexists(index):
        return list(read_index(index))
    shards = sorted(ckpt.glob("*.safetensors"))
    if len(shards) == 1:
        return list(read_header(shards[0]).tensors)
    if shards:
        raise DsV4Error(f"{ckpt}: {len(shards)} .safetensors files but no {INDEX_NAME}")
    return None


def plan_fix(
    ckpt: str | Path, target: str = DEFAULT_TARGET, source_config: str | Path | None = None
) -> FixResult:
    """Read and validate everything, compute the rewrite; writes nothing."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise DsV4Error(f"{ckpt}: not a directory")
    cfg_path = ckpt / CONFIG_NAME
    config = _load_json(cfg_path, "config.json")
    src = None
    if source_config is not None:
        src = _load_json(Path(source_config), "source config")
    hfq_path = ckpt / HF_QUANT_CONFIG
    hfq = _load_json(hfq_path, HF_QUANT_CONFIG) if hfq_path.exists() else None
    return fix_config(
        config,
        target=target,
        source_config=src,
        tensor_keys=tensor_keys(ckpt),
        hf_quant_config=hfq,
        where=str(cfg_path),
        source_where=str(source_config) if source_config is not None else "source config",
    )


def write_fix(ckpt: str | Path, result: FixResult) -> list[Path]:
    """Write the result: backups first (once), then hf_quant_config.json, then config.json."""
    ckpt = Path(ckpt)
    written: list[Path] = []
    if not result.changed:
        return written
    targets = [(ckpt / CONFIG_NAME, result.config)]
    if any(c.key.startswith(HF_QUANT_CONFIG) for c in result.changes) and result.hf_quant_config is not None:
        targets.insert(0, (ckpt / HF_QUANT_CONFIG, result.hf_quant_config))
    for path, _ in targets:
        backup = path.with_name(path.name + BACKUP_SUFFIX)
        if path.exists() and not backup.exists():
            copy_file_atomic(path, ckpt, backup.name)
            written.append(backup)
    for path, obj in targets:
        write_json_atomic(path, obj)
        written.append(path)
    return written


def describe_fix(
    ckpt: str | Path, result: FixResult, written: list[Path], *, dry_run: bool, target: str
) -> str:
    """Each change with its reason, then the files written (or that nothing was)."""
    head = "would change" if dry_run else "changed"
    lines = [f"{ckpt}: {head} for vLLM {target} ({len(result.changes)} changes):"]
    lines += ["  " + c.describe().replace("\n", "\n  ") for c in result.changes]
    lines += [f"wrote {p}" for p in written]
    if dry_run:
        lines.append("dry run: nothing written")
    return "\n".join(lines)
