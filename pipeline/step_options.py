"""The command-line options every streaming step (`dsv4 dequant`, `dsv4 convert`) shares, defined once so
that their names, defaults and help agree."""

from __future__ import annotations

import argparse

DEFAULT_SHARD_GIB = 5.0
DEFAULT_SHARD_BYTES = int(DEFAULT_SHARD_GIB * 1024**3)  # a size the hub and vLLM's loader handle well


def add_streaming_options(p: argparse.ArgumentParser, *, compute: bool = True) -> None:
    """--resume/--overwrite, --max-shard-gib, --full-scales, --dry-run, --quiet; and, for steps that
    convert tensors (``compute``), --device and --workers."""
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--resume", action="store_true", help="keep shards a killed run finished, redo the rest"
    )
    mode.add_argument(
        "--overwrite",
        action="store_true",
        help="delete a previous dsv4 output in DST first (a folder holding anything dsv4 did not write is "
        "refused)",
    )
    if compute:
        p.add_argument(
            "--device",
            default="auto",
            help="auto (CUDA if available, else CPU), cpu, cuda or cuda:N (default: auto)",
        )
        p.add_argument(
            "--workers",
            type=int,
            default=2,
            help="tensors converted ahead of the writer, in threads (default: 2)",
        )
    p.add_argument(
        "--max-shard-gib",
        type=float,
        default=DEFAULT_SHARD_GIB,
        help=f"largest output shard, GiB of tensor data (default: {DEFAULT_SHARD_GIB:g})",
    )
    p.add_argument("--full-scales", action="store_true", help="validate every scale tensor, not a sample")
    p.add_argument(
        "--dry-run", action="store_true", help="validate and print the plan from headers; write nothing"
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines (the summary is still printed)")


def max_shard_bytes(args: argparse.Namespace) -> int:
    return int(args.max_shard_gib * 1024**3)
