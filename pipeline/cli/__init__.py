"""The `dsv4` command. Each command lives in its own module here, named after it (`dsv4 fix-config` is
pipeline/cli/fix_config.py) and listed in SUBCOMMANDS. A command module provides

    SUMMARY               its line in `dsv4 --help`
    register(subparsers)  adds its parser (options.command_parser) and sets ``func`` to the function
                          that runs it and returns the exit status

and imports the steps it runs only inside those functions. Only the command being run is registered in
full, so `dsv4 --help` and `dsv4 --version` import no step and no torch (they took 7-8 s when they did).
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys
from collections.abc import Collection, Sequence
from typing import NoReturn

from pipeline.cli.options import HelpFormatter, command_name
from pipeline.errors import DsV4Error, Interrupted

# Command modules, in the order `dsv4 --help` lists them. Adding a step means adding its module here.
SUBCOMMANDS: tuple[str, ...] = (
    "pipeline.cli.demo",
    "pipeline.cli.validate",
    "pipeline.cli.inspect",
    "pipeline.cli.dequant",
    "pipeline.cli.quantize",
    "pipeline.cli.calibrate",
    "pipeline.cli.convert",
    "pipeline.cli.fix_config",
    "pipeline.cli.slice",
    "pipeline.cli.serve",
    "pipeline.cli.use_plugin",
    "pipeline.cli.transcode_scan",
    "pipeline.cli.e2e",
)

DESCRIPTION = """\
DeepSeek V4 Pro -> NVFP4 -> vLLM, one verified step at a time.

Each step streams tensor by tensor, never writes into its input, writes each output shard under a
temporary name and renames it when complete, and validates its inputs before the long work starts.
"""

EPILOG = """\
Run `dsv4 <command> --help` for a command's options. Docs: README.md in the project.
"""

INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a command stopped by Ctrl-C


class _VersionAction(argparse.Action):
    """--version: the package version and the digest of the code that runs (pipeline/provenance.py),
    computed only when asked for: hashing the source on every `dsv4` call would slow them all."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> NoReturn:
        from pipeline import __version__
        from pipeline.provenance import code_digest

        print(f"dsv4-nvfp4 {__version__} (code {code_digest()})")
        parser.exit()


def command_names() -> list[str]:
    return [command_name(m) for m in SUBCOMMANDS]


def build_parser(commands: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The `dsv4` parser. Every command is listed; those named in ``commands`` (all when None) get their
    full parser, the others only their summary, so that the steps they would import are not loaded."""
    parser = argparse.ArgumentParser(
        prog="dsv4", description=DESCRIPTION, epilog=EPILOG, formatter_class=HelpFormatter
    )
    parser.add_argument("--version", action=_VersionAction, help="print the version and the code digest")
    subparsers = parser.add_subparsers(title="commands", metavar="<command>")
    for module_name in SUBCOMMANDS:
        module = importlib.import_module(module_name)
        name = command_name(module_name)
        if commands is None or name in commands:
            module.register(subparsers)
        else:
            subparsers.add_parser(name, help=module.SUMMARY)
    return parser


def command_word(argv: Sequence[str]) -> str | None:
    """The command in ``argv``: its first word that is not an option (dsv4's own options take no value)."""
    return next((word for word in argv if not word.startswith("-")), None)


def unknown_command(word: str) -> str:
    """One line for a command that does not exist, with the nearest one when there is a near one."""
    names = command_names()
    near = difflib.get_close_matches(word, names, n=1)
    hint = f"did you mean {near[0]!r}?" if near else f"the commands are {', '.join(names)}"
    return f"unknown command {word!r}; {hint}"


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
    words = sys.argv[1:] if argv is None else list(argv)
    command = command_word(words)
    if command is not None and command not in command_names():
        print(f"dsv4: error: {unknown_command(command)}", file=sys.stderr)
        return 2
    parser = build_parser(commands=() if command is None else (command,))
    args = parser.parse_args(words)
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
