"""The live check: import hf_ptq (needs ModelOpt), capture its own parser, check the extracted flags
against it and record what the tree only has as expressions."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from .contract import ContractError
from .driver import import_hf_ptq, parse


def _capture_parser(module: ModuleType, argv: Sequence[str]) -> argparse.ArgumentParser:
    captured: list[argparse.ArgumentParser] = []
    real = argparse.ArgumentParser.parse_args

    def spy(self, *a, **k):
        captured.append(self)
        return real(self, *a, **k)

    argparse.ArgumentParser.parse_args = spy  # type: ignore[method-assign]
    try:
        parse(module, argv)
    finally:
        argparse.ArgumentParser.parse_args = real  # type: ignore[method-assign]
    return captured[0]


def resolve_runtime_values(hf_ptq_path: Path, contract: dict[str, Any]) -> dict[str, Any]:
    """Import hf_ptq, take its live parser, and check it against the tree's flags; fill expressions."""
    from importlib.metadata import PackageNotFoundError, version

    module = import_hf_ptq(hf_ptq_path)
    required = [f for f in contract["flags"] if f["required"]]
    argv = [w for f in required for w in (f["option_strings"][0], "x")]
    parser = _capture_parser(module, argv)
    live = {a.dest: a for a in parser._actions if a.dest != "help"}
    ours = {f["dest"]: f for f in contract["flags"]}
    if set(live) != set(ours):
        raise ContractError(
            f"live parser and syntax tree disagree: only live {sorted(set(live) - set(ours))}, "
            f"only tree {sorted(set(ours) - set(live))}"
        )
    for dest, flag in ours.items():
        action = live[dest]
        if list(action.option_strings) != flag["option_strings"]:
            raise ContractError(f"{dest}: option strings {action.option_strings} vs {flag['option_strings']}")
        for key in ("default", "choices"):
            if isinstance(flag[key], dict) and "expr" in flag[key]:
                flag[key]["resolved"] = (
                    list(getattr(action, key)) if key == "choices" else getattr(action, key)
                )
            elif (
                flag[key] is not None
                and getattr(action, key) != flag[key]
                and not (key == "choices" and list(getattr(action, key)) == list(flag[key]))
            ):
                raise ContractError(f"{dest}: live {key} {getattr(action, key)!r} vs tree {flag[key]!r}")
    try:
        modelopt_version = version("nvidia-modelopt")
    except PackageNotFoundError:
        modelopt_version = None
    runtime: dict[str, Any] = {"imported_with_nvidia_modelopt": modelopt_version}
    for name in ("KV_QUANT_CFG_CHOICES", "QUANT_CFG_CHOICES"):
        if hasattr(module, name):
            runtime[name] = sorted(getattr(module, name))
    if hasattr(module, "get_supported_datasets"):
        runtime["supported_datasets"] = sorted(module.get_supported_datasets())
    return runtime
