"""The `dsv4` command. Each subcommand lives in its own module, listed in SUBCOMMANDS; a module
provides ``register(subparsers)``, which adds its parser and sets ``func`` to the function that runs it
(returning an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import NoReturn

from pipeline import __version__
from pipeline.errors import DsV4Error, Interrupted
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


INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a command stopped by Ctrl-C


def _os_error_line(err: OSError) -> str:
    """The last resort for an OSError no step turned into a DsV4Error: still one line, naming the file."""
    where = f"{err.filename}: " if err.filename else ""
    return f"{where}{err.strerror or err}"


def _exit_now(code: int) -> NoReturn:
    """End the process without joining worker threads: after Ctrl-C a conversion thread may be midway
    through a tensor nobody will write, and the interpreter would wait for it. The writer has already
    left the disk consistent (journal + finished shards, no partial file)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    """Run one command. ``argv`` None means the process is ours (the `dsv4` script, `python -m
    pipeline`): after Ctrl-C it exits at once; an in-process caller passing ``argv`` gets 130 back."""
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
    except KeyboardInterrupt as err:
        detail = f": {err}" if isinstance(err, Interrupted) else ""
        print(f"dsv4: interrupted{detail}", file=sys.stderr)
        if argv is None:
            _exit_now(INTERRUPTED)
        return INTERRUPTED
    except OSError as err:
        print(f"dsv4: error: {_os_error_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
