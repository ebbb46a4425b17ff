"""How a command declares its parser: the help format, and the options several commands share, defined
once so that their names, defaults and help agree from one command to the next.

Imported by `dsv4 --help`, so it imports nothing beyond the standard library and torch-free constants.
"""

from __future__ import annotations

import argparse

from pipeline.step_options import DEFAULT_GPU_WORKERS, DEFAULT_SHARD_GIB

GIB = 1024**3


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions as written (they hold tables), and each option's default after its help, except where
    the default says nothing: an off switch (False) or an unset option (None, []), whose help says what
    happens instead."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


def command_name(module_name: str) -> str:
    """`dsv4 fix-config` lives in pipeline/cli/fix_config.py: the command is its module's name."""
    return module_name.rsplit(".", 1)[1].replace("_", "-")


def command_parser(
    subparsers: argparse._SubParsersAction, module_name: str, summary: str, description: str
) -> argparse.ArgumentParser:
    """The parser of the command living in ``module_name``; ``summary`` is its line in `dsv4 --help`."""
    return subparsers.add_parser(
        command_name(module_name), help=summary, description=description, formatter_class=HelpFormatter
    )


def add_target_vllm(p: argparse.ArgumentParser) -> None:
    from pipeline.vllm_config.targets import DEFAULT_TARGET, VLLM_TARGETS

    p.add_argument(
        "--target-vllm",
        choices=VLLM_TARGETS,
        default=DEFAULT_TARGET,
        help="the vLLM version that serves the checkpoint: config.json is written for (or checked "
        "against) its rules",
    )


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        default="auto",
        metavar="DEVICE",
        help="auto (CUDA if available, else CPU), cpu, cuda or cuda:N",
    )


def add_dry_run(p: argparse.ArgumentParser, prints: str) -> None:
    p.add_argument("--dry-run", action="store_true", help=f"{prints}; write nothing")


def add_json(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--json", action="store_true", help=f"print {what} as JSON")


def add_full_scales(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--full-scales",
        action="store_true",
        help="check every scale tensor, not a deterministic sample (all of them are about 24 GiB on "
        "the release)",
    )


def add_streaming_options(p: argparse.ArgumentParser, *, compute: bool = True) -> None:
    """What every streaming step (`dsv4 dequant`, `convert`, `slice`) takes: --resume/--overwrite,
    --max-shard-gib, --full-scales, --dry-run, --quiet; and, for steps that convert tensors
    (``compute``), --device, --workers and --gpu-workers."""
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
        add_device(p)
        p.add_argument(
            "--workers",
            type=int,
            default=None,
            metavar="N",
            help="CPU converter threads running ahead of the writer; unset: one per core this process may "
            "use; 0 (with a CUDA device): every tensor on the GPU",
        )
        p.add_argument(
            "--gpu-workers",
            type=int,
            default=None,
            metavar="N",
            help="with a CUDA device: threads feeding the GPU the jobs it does faster (re-quantizing, "
            "NVFP4 <-> FP8; dequant has none), beside the CPU threads, which take the rest (table "
            "lookups, copies) and any such job the GPU threads are too busy for; the same bytes either "
            f"way. unset: {DEFAULT_GPU_WORKERS}",
        )
    p.add_argument(
        "--max-shard-gib",
        type=float,
        default=DEFAULT_SHARD_GIB,
        metavar="GIB",
        help="largest output shard, GiB of tensor data",
    )
    add_full_scales(p)
    add_dry_run(p, "validate and print the plan from headers")
    p.add_argument("--quiet", action="store_true", help="no progress lines (the summary is still printed)")


def max_shard_bytes(args: argparse.Namespace) -> int:
    return int(args.max_shard_gib * GIB)


def streaming_step_arguments(args: argparse.Namespace) -> dict:
    """The streaming options as the steps' functions take them (dequantize_checkpoint, convert_checkpoint
    and slice_checkpoint share these parameter names)."""
    arguments = dict(
        resume=args.resume,
        overwrite=args.overwrite,
        max_shard_bytes=max_shard_bytes(args),
        full_scales=args.full_scales,
        progress=not args.quiet,
    )
    if hasattr(args, "workers"):  # a step that converts tensors: add_streaming_options(compute=True)
        arguments.update(device=args.device, workers=args.workers, gpu_workers=args.gpu_workers)
    return arguments
