"""The `dsv4` command. Each subcommand lives in its own module, listed in SUBCOMMANDS; a module
provides ``register(subparsers)``, which adds its parser and sets ``func`` to the function that runs it
(returning an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pipeline import __version__
from pipeline.errors import DsV4Error
from pipeline.provenance import code_digest

# Subcommand modules, in the order `dsv4 --help` lists them. Adding a step means adding its module here.
SUBCOMMANDS: tuple[str, ...] = (
    "pipeline.demo",
    "pipeline.validate_cmd",
    "pipeline.inspect_cmd",
    "pipeline.dequant_cmd",
    "pipeline.quantize_cmd",
    "pipeline.convert_cmd",
    "pipeline.fix_config_cmd",
    "pipeline.slice_cmd",
    "pipeline.serve_cmd",
    "pipeline.use_plugin_cmd",
    "pipeline.transcode_scan",
    "pipeline.e2e_cmd",
)

DESCRIPTION = """\
DeepSeek V4 Pro -> NVFP4 -> vLLM, one verified step at a time.

Each step streams tensor by tensor, never writes into its input, writes each output shard under a
temporary name and renames it when complete, and validates its inputs before the long work starts.
"""

EPILOG = """\
Run `dsv4 <command> --help` for a command's options. Docs: README.md in the project.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsv4",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version", action="version", version=f"dsv4-nvfp4 {__version__} (code {code_digest()})"
    )
    subparsers = parser.add_subparsers(title="commands", metavar="<command>")
    for module_name in SUBCOMMANDS:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except DsV4Error as err:
        print(f"dsv4: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
