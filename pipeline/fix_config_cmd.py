"""`dsv4 fix-config CKPT`: rewrite config.json (+ hf_quant_config.json) for vLLM (see pipeline/config.py)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from pipeline.checkpoint.reader import INDEX_NAME, read_header, read_index, read_json_object
from pipeline.checkpoint.writer import copy_file_atomic, write_json_atomic
from pipeline.config import DEFAULT_TARGET, HF_QUANT_CONFIG, RULES, VLLM_TARGETS, FixResult, fix_config
from pipeline.errors import DsV4Error

CONFIG_NAME = "config.json"
BACKUP_SUFFIX = ".orig"

HELP = """\
Rewrite CKPT/config.json so that vLLM's DeepSeek V4 code loads it, and write CKPT/hf_quant_config.json
for a checkpoint with NVFP4 routed experts (the mixed FP8 + NVFP4 layout).

The rewrites are a table of named rules, each applying to some vLLM versions:
{table}

Every change is printed with its reason; "unchanged: already fixed" when there is nothing to do.
Running it twice changes nothing the second time. The first rewrite keeps the original as
config.json.orig (and hf_quant_config.json.orig); files are written atomically (temp + rename).
The tensor list comes from CKPT/model.safetensors.index.json (or the one .safetensors header).
"""


def _table() -> str:
    return "\n".join(f"  {r.name:<18} [{', '.join(r.versions)}] {', '.join(r.keys)}" for r in RULES)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "fix-config",
        help="rewrite config.json (+ hf_quant_config.json) for vLLM 0.32/0.33",
        description=HELP.format(table=_table()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("ckpt", help="checkpoint directory (with config.json)")
    p.add_argument(
        "--target-vllm",
        choices=VLLM_TARGETS,
        default=DEFAULT_TARGET,
        help=f"vLLM version the checkpoint is for (default: {DEFAULT_TARGET})",
    )
    p.add_argument(
        "--source-config",
        metavar="PATH",
        help="the release/BF16 config.json the checkpoint came from (restores compress_ratios, "
        "num_hash_layers)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the changes, write nothing")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_main)


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


def plan(
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


def apply(ckpt: str | Path, result: FixResult) -> list[Path]:
    """Write the result: backups first (once), then hf_quant_config.json, then config.json."""
    ckpt = Path(ckpt)
    written = []
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


def _main(args: argparse.Namespace) -> int:
    result = plan(args.ckpt, args.target_vllm, args.source_config)
    written = [] if args.dry_run else apply(args.ckpt, result)
    if args.json:
        print(
            json.dumps(
                {
                    "ckpt": str(args.ckpt),
                    "target_vllm": args.target_vllm,
                    "dry_run": args.dry_run,
                    "changed": result.changed,
                    "changes": [c.to_json() for c in result.changes],
                    "written": [str(p) for p in written],
                },
                indent=2,
            )
        )
        return 0
    if not result.changed:
        print(f"{args.ckpt}: unchanged: already fixed for vLLM {args.target_vllm}")
        return 0
    print_changes(args.ckpt, result, written, dry_run=args.dry_run, target=args.target_vllm)
    return 0


def print_changes(
    ckpt: str | Path, result: FixResult, written: list[Path], *, dry_run: bool, target: str
) -> None:
    """Each change with its reason, then the files written (or that nothing was)."""
    head = "would change" if dry_run else "changed"
    print(f"{ckpt}: {head} for vLLM {target} ({len(result.changes)} changes):")
    for c in result.changes:
        print("  " + c.describe().replace("\n", "\n  "))
    for p in written:
        print(f"wrote {p}")
    if dry_run:
        print("dry run: nothing written")
