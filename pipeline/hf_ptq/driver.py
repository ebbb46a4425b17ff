"""Run hf_ptq.py the way its own command line does: locate -> import (its folder on sys.path) -> argv
with hf_ptq's OWN flag names -> its own parse_args() -> the __main__ conversions -> main(args)."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import itertools
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from types import ModuleType
from typing import Any

from pipeline.errors import DsV4Error

from .contract import flags_by_dest, load_contract
from .options import OPTION_TABLE, HfPtqConfig

# Where hf_ptq.py lives inside a ModelOpt checkout, newest layout first (0.47 renamed llm_ptq -> hf_ptq).
HF_PTQ_LAYOUTS: tuple[str, ...] = ("examples/hf_ptq/hf_ptq.py", "examples/llm_ptq/hf_ptq.py")


def locate_hf_ptq(repo: Path) -> Path:
    """The hf_ptq.py of a ModelOpt checkout: ``examples/hf_ptq/`` (0.47+) or ``examples/llm_ptq/``."""
    repo = Path(repo)
    for rel in HF_PTQ_LAYOUTS:
        if (repo / rel).is_file():
            return repo / rel
    looked = ", ".join(str(repo / rel) for rel in HF_PTQ_LAYOUTS)
    raise DsV4Error(
        f"no hf_ptq.py in ModelOpt checkout {repo}: looked for {looked} "
        "(the pip wheel ships no examples; clone github.com/NVIDIA/Model-Optimizer at the installed version)"
    )


@contextlib.contextmanager
def _folder_on_sys_path(folder: Path) -> Iterator[None]:
    """hf_ptq imports its siblings (example_utils, ...) by bare name, some lazily inside functions.

    For the duration: the folder is first on sys.path, and same-named modules from elsewhere (another
    checkout imported earlier) are set aside so the siblings come from this folder. Afterwards sys.path
    is restored, siblings imported from this folder leave sys.modules (their importers keep references)
    and the set-aside modules come back.
    """
    folder = Path(folder).resolve()
    entry = str(folder)
    sibling_names = {p.stem for p in folder.glob("*.py")}
    set_aside = {n: sys.modules.pop(n) for n in sibling_names if n in sys.modules}
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(entry)
        for name in sibling_names:
            mod_file = getattr(sys.modules.get(name), "__file__", None)
            if mod_file and Path(mod_file).resolve().parent == folder:
                del sys.modules[name]
        for name, mod in set_aside.items():
            sys.modules.setdefault(name, mod)


_import_counter = itertools.count()


def import_hf_ptq(path: Path) -> ModuleType:
    """Import hf_ptq.py under a unique module name with its folder on sys.path (restored after; see
    ``_folder_on_sys_path`` for how sibling modules of different checkouts are kept apart)."""
    path = Path(path).resolve()
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    name = f"_dsv4_hf_ptq_{digest}_{next(_import_counter)}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise DsV4Error(f"{path}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        with _folder_on_sys_path(path.parent):
            spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def kv_cache_qformat_choices(module: ModuleType) -> list[str]:
    """hf_ptq's KV cache formats, from hf_ptq's own namespace (Run 4 looked for them on mtq)."""
    choices = getattr(module, "KV_QUANT_CFG_CHOICES", None)
    if choices is None:
        raise DsV4Error(f"{module.__file__}: defines no KV_QUANT_CFG_CHOICES")
    return list(choices)


def _render_value(flag: Mapping[str, Any], value: Any, joiner: str | None) -> list[str]:
    """The argv words that make argparse store ``value`` for this flag."""
    option = flag["option_strings"][0]
    action = flag["action"]
    if action in ("store_true", "store_false"):
        if not isinstance(value, bool):
            raise DsV4Error(f"{option} is a switch; got {value!r}")
        return [option] if value == (action == "store_true") else []
    if action == "BooleanOptionalAction":
        if not isinstance(value, bool):
            raise DsV4Error(f"{option} is a switch; got {value!r}")
        return [option] if value else ["--no-" + option[2:]]
    if action != "store":
        raise DsV4Error(f"{option}: the driver does not know how to pass argparse action {action!r}")
    if isinstance(value, (tuple, list)):
        if joiner is None:
            raise DsV4Error(f"{option} takes one value and no __main__ conversion splits it; got {value!r}")
        if not value:
            raise DsV4Error(f"{option}: empty list")
        return [option, joiner.join(str(v) for v in value)]
    return [option, str(value)]


def build_argv(cfg: HfPtqConfig, contract: Mapping[str, Any]) -> list[str]:
    """hf_ptq's command line for ``cfg``: hf_ptq's own flag strings, taken from the contract."""
    by_dest = flags_by_dest(contract)
    # a list-valued option is passed joined with the separator the __main__ block splits it on
    joiners = {c["attribute"]: c["split_on"] for c in contract["main_block"]["conversions"]}
    argv: list[str] = []
    for field in fields(cfg):
        value = getattr(cfg, field.name)
        dest = OPTION_TABLE[field.name]
        if dest not in by_dest:
            raise DsV4Error(
                f"hf_ptq ({contract['source']['commit']}) has no option with dest {dest!r} "
                f"for our '{field.name}'; update OPTION_TABLE in pipeline/hf_ptq/options.py"
            )
        if value is None:
            continue
        argv += _render_value(by_dest[dest], value, joiners.get(dest))
    return argv


def parse(module: ModuleType, argv: Sequence[str]) -> argparse.Namespace:
    """Call the module's own ``parse_args()`` with ``sys.argv`` replaced by ``argv`` (restored after)."""
    saved = sys.argv
    sys.argv = [str(getattr(module, "__file__", "hf_ptq.py")), *argv]
    try:
        return module.parse_args()
    except SystemExit as e:  # argparse reports to stderr and exits 2
        raise DsV4Error(f"hf_ptq's parse_args rejected {list(argv)} (exit {e.code}; see stderr)") from e
    finally:
        sys.argv = saved


def _gate_is_inert(gate: Mapping[str, Any], value: Any) -> bool:
    inert_if = gate["inert_if"]
    if inert_if == "is None":
        return value is None
    if inert_if == "falsy":
        return not value
    if isinstance(inert_if, dict) and "equals" in inert_if:
        return value == inert_if["equals"]
    raise DsV4Error(f"hf_ptq contract: unknown guard gate {inert_if!r}")


def apply_main_conversions(args: argparse.Namespace, contract: Mapping[str, Any]) -> argparse.Namespace:
    """Do, in place, what hf_ptq's ``__main__`` block does between ``parse_args()`` and ``main(args)``.

    Conversions are applied exactly as recorded. The block's other statements are guards (a warning or
    an error for options this driver never sets); each must be inert for these args, else we refuse
    rather than silently skip what hf_ptq's command line would have done.
    """
    block = contract["main_block"]
    for conv in block["conversions"]:
        attr = conv["attribute"]
        value = getattr(args, attr)
        if conv["only_if_str"] and not isinstance(value, str):
            continue  # e.g. dataset left at None: hf_ptq's load_model fills its documented default
        if not isinstance(value, str):
            raise DsV4Error(
                f"args.{attr} is {value!r}; hf_ptq's __main__ splits a str here (converted twice?)"
            )
        parts = value.split(conv["split_on"])
        if conv["element"] == "int":
            try:
                parts = [int(p) for p in parts]
            except ValueError as e:
                raise DsV4Error(f"args.{attr}={value!r}: hf_ptq needs comma-separated ints") from e
        elif conv["element"] != "str":
            raise DsV4Error(f"hf_ptq contract: conversion of {attr} to unknown element {conv['element']!r}")
        setattr(args, attr, parts)
    for guard in block["guards"]:
        gate = guard["gate"]
        if not _gate_is_inert(gate, getattr(args, gate["attribute"])):
            raise DsV4Error(
                f"hf_ptq's __main__ has a guard on args.{gate['attribute']} ({guard['effect']}) that this "
                f"driver does not replicate; args.{gate['attribute']}={getattr(args, gate['attribute'])!r}"
            )
    return args


def missing_main_attributes(args: argparse.Namespace, contract: Mapping[str, Any]) -> list[str]:
    """Attributes main() (or what it hands args to) reads that these args lack (Runs 6-7)."""
    return [a for a in contract["main_reads"]["required"] if not hasattr(args, a)]


def prepare(cfg: HfPtqConfig, repo: Path, contract: Mapping[str, Any] | None = None):
    """locate -> import -> argv -> parse -> conversions; returns (module, args, argv). No main()."""
    contract = load_contract() if contract is None else contract
    path = locate_hf_ptq(repo)
    module = import_hf_ptq(path)
    kv_ok = [*kv_cache_qformat_choices(module), getattr(module, "KV_CACHE_NONE", "none")]
    if cfg.kv_cache_qformat is not None and cfg.kv_cache_qformat not in kv_ok:
        raise DsV4Error(
            f"kv_cache_qformat {cfg.kv_cache_qformat!r} is not one of hf_ptq's KV_QUANT_CFG_CHOICES "
            f"{kv_ok[:-1]} (or {kv_ok[-1]!r})"
        )
    argv = build_argv(cfg, contract)
    args = apply_main_conversions(parse(module, argv), contract)
    missing = missing_main_attributes(args, contract)
    if missing:
        raise DsV4Error(f"parsed hf_ptq args lack attributes main() reads: {missing}")
    return module, args, argv


def run(cfg: HfPtqConfig, repo: Path, contract: Mapping[str, Any] | None = None) -> argparse.Namespace:
    """The whole thing, on the node: ``module.main(args)`` with hf_ptq's folder on sys.path throughout
    (its helpers import siblings lazily). On a machine without CUDA, main raises OSError."""
    module, args, _ = prepare(cfg, repo, contract)
    with _folder_on_sys_path(Path(module.__file__).parent):
        module.main(args)
    return args
