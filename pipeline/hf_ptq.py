"""Drive ModelOpt's ``hf_ptq.py`` example the way its own command line does, without a shell script.

The seeds lost Runs 4-9 re-creating hf_ptq's entry point by hand: a constant taken from the wrong module,
a hand-built ``argparse.Namespace`` missing attributes, ``dataset=None``, the shell script's flag names,
and the skipped post-parse conversions of its ``if __name__ == "__main__":`` block. This driver does
what that block does and nothing else:

    locate -> import (its folder on sys.path) -> build argv with hf_ptq's OWN flag names -> hf_ptq's own
    ``parse_args()`` (sys.argv swapped in, restored after) -> the ``__main__`` conversions -> ``main(args)``

Everything version-specific comes from a recorded contract (``fixtures/hf_ptq_contract.json``):
the flags hf_ptq defines, the ``__main__`` conversions as data, and the attributes of ``args`` that
``main()`` and the functions it hands ``args`` to read. ``extract_contract`` regenerates it from a real
hf_ptq.py by reading its syntax tree (no import needed); ``resolve_runtime=True`` also imports it and
checks the live parser against the tree. The crosscheck tier compares a fresh extraction with the
recorded file, so a ModelOpt bump shows up as a diff instead of a failed seven-hour run.

This module imports nothing heavy; ModelOpt and transformers are imported only by hf_ptq itself.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import importlib.util
import itertools
import json
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from types import ModuleType
from typing import Any

from pipeline.errors import DsV4Error

CONTRACT_PATH = Path(__file__).resolve().parents[1] / "fixtures" / "hf_ptq_contract.json"
CONTRACT_SCHEMA = 1

# Where hf_ptq.py lives inside a ModelOpt checkout, newest layout first (0.47 renamed llm_ptq -> hf_ptq).
HF_PTQ_LAYOUTS: tuple[str, ...] = ("examples/hf_ptq/hf_ptq.py", "examples/llm_ptq/hf_ptq.py")


# --------------------------------------------------------------------------------------------------
# Our configuration and the ONE table from our option names to hf_ptq's argparse destinations.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HfPtqConfig:
    """One quantization run in our words. ``None`` means "leave hf_ptq's own default"."""

    model_path: str
    export_path: str
    qformat: str = "nvfp4"
    calib_size: tuple[int, ...] = (128,)  # one entry per dataset (hf_ptq pads/truncates to match)
    calib_seq: int | None = 512
    batch_size: int | None = None  # hf_ptq's 0 = probe the largest batch; the node may want 1
    datasets: tuple[str, ...] | None = None  # None: hf_ptq's fallback (cnn_dailymail + Nemotron v2 mix)
    kv_cache_qformat: str | None = "fp8_cast"
    inference_tensor_parallel: int | None = 8
    inference_pipeline_parallel: int | None = None
    gpu_max_mem_percentage: float | None = 0.7
    use_seq_device_map: bool = True
    trust_remote_code: bool = False
    skip_generate: bool | None = None
    verbose: bool | None = None
    device: str | None = None
    attn_implementation: str | None = None


# our recipe -> hf_ptq's --qformat (a key of modelopt.recipe.presets.QUANT_CFG_CHOICES in 0.47):
# nvfp4_experts_only quantizes the routed experts only, NVIDIA's V4 recipe; nvfp4 every linear.
RECIPE_QFORMAT: Mapping[str, str] = {"experts": "nvfp4_experts_only", "full": "nvfp4"}


# The seeds' notes: "Don't use calib_size=256 — OOMs with 3TB BF16 on CPU offload"; Run 11 used 128.
NODE_CALIB_SIZE_LIMIT = 128


def config_for_recipe(
    recipe: str,
    model_path: str,
    export_path: str,
    *,
    calib_size: int,
    calib_seq: int,
    batch_size: int | None = None,
    calib_file: str | None = None,
    tensor_parallel: int | None = 8,
) -> HfPtqConfig:
    """`dsv4 quantize --driver hf_ptq`'s options as an HfPtqConfig (the seeds' Run 11 settings otherwise)."""
    if recipe not in RECIPE_QFORMAT:
        raise DsV4Error(f"recipe {recipe!r} has no hf_ptq qformat; known: {', '.join(RECIPE_QFORMAT)}")
    if calib_size > NODE_CALIB_SIZE_LIMIT:
        raise DsV4Error(
            f"--calib-size {calib_size}: the seeds' 256-sample calibration ran out of memory on the node (3 TB "
            f"of BF16 offloaded to CPU); Run 11 used {NODE_CALIB_SIZE_LIMIT}, the most this driver passes"
        )
    return HfPtqConfig(
        model_path=model_path,
        export_path=export_path,
        qformat=RECIPE_QFORMAT[recipe],
        calib_size=(calib_size,),
        calib_seq=calib_seq,
        batch_size=batch_size,
        datasets=(calib_file,) if calib_file else None,
        inference_tensor_parallel=tensor_parallel,
    )


# our field -> hf_ptq argparse dest. The flag string itself is read from the contract for that dest.
OPTION_TABLE: Mapping[str, str] = {
    "model_path": "pyt_ckpt_path",
    "export_path": "export_path",
    "qformat": "qformat",
    "calib_size": "calib_size",
    "calib_seq": "calib_seq",
    "batch_size": "batch_size",
    "datasets": "dataset",
    "kv_cache_qformat": "kv_cache_qformat",
    "inference_tensor_parallel": "inference_tensor_parallel",
    "inference_pipeline_parallel": "inference_pipeline_parallel",
    "gpu_max_mem_percentage": "gpu_max_mem_percentage",
    "use_seq_device_map": "use_seq_device_map",
    "trust_remote_code": "trust_remote_code",
    "skip_generate": "skip_generate",
    "verbose": "verbose",
    "device": "device",
    "attn_implementation": "attn_implementation",
}


def seeds_config(model_path: str, export_path: str) -> HfPtqConfig:
    """Run 11's settings: nvfp4, 128 calibration samples of 512 tokens, fp8_cast KV cache, 70% of each
    GPU, sequential device map, tensor parallel 8, hf_ptq's default dataset mix."""
    return HfPtqConfig(model_path=model_path, export_path=export_path)


# --------------------------------------------------------------------------------------------------
# The recorded contract
# --------------------------------------------------------------------------------------------------


def load_contract(path: Path = CONTRACT_PATH) -> dict[str, Any]:
    try:
        contract = json.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise DsV4Error(f"{path}: no recorded hf_ptq contract (regenerate: python -m pipeline.hf_ptq)") from e
    if contract.get("schema") != CONTRACT_SCHEMA:
        raise DsV4Error(
            f"{path}: key 'schema' is {contract.get('schema')!r}, this driver reads {CONTRACT_SCHEMA}"
        )
    return contract


def _flags_by_dest(contract: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {flag["dest"]: flag for flag in contract["flags"]}


# --------------------------------------------------------------------------------------------------
# locate / import / argv / parse / conversions / run
# --------------------------------------------------------------------------------------------------


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
    by_dest = _flags_by_dest(contract)
    # a list-valued option is passed joined with the separator the __main__ block splits it on
    joiners = {c["attribute"]: c["split_on"] for c in contract["main_block"]["conversions"]}
    argv: list[str] = []
    for field in fields(cfg):
        value = getattr(cfg, field.name)
        dest = OPTION_TABLE[field.name]
        if dest not in by_dest:
            raise DsV4Error(
                f"hf_ptq ({contract['source']['commit']}) has no option with dest {dest!r} "
                f"for our '{field.name}'; update OPTION_TABLE in pipeline/hf_ptq.py"
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


# --------------------------------------------------------------------------------------------------
# Contract extraction from a real hf_ptq.py (syntax tree; optional live check)
# --------------------------------------------------------------------------------------------------


class ContractError(DsV4Error):
    """hf_ptq.py has a shape the extractor does not recognise: read it and teach the extractor."""


class _Module:
    """One example module: its top-level functions and the names it imports from sibling modules."""

    def __init__(self, path: Path):
        self.path = path
        self.name = path.stem
        self.tree = ast.parse(path.read_text(), filename=str(path))
        self.functions = {n.name: n for n in self.tree.body if isinstance(n, ast.FunctionDef)}
        self.sibling_imports: dict[str, tuple[str, str]] = {}
        for node in ast.walk(self.tree):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.level == 0
                and (path.parent / f"{node.module}.py").is_file()
            ):
                for alias in node.names:
                    self.sibling_imports[alias.asname or alias.name] = (node.module, alias.name)


class _Examples:
    def __init__(self, hf_ptq_path: Path):
        self.folder = hf_ptq_path.parent
        self.modules: dict[str, _Module] = {}
        self.root = self.module(hf_ptq_path.stem)

    def module(self, name: str) -> _Module:
        if name not in self.modules:
            self.modules[name] = _Module(self.folder / f"{name}.py")
        return self.modules[name]

    def resolve(self, mod: _Module, call: ast.Call) -> tuple[_Module, ast.FunctionDef] | None:
        if not isinstance(call.func, ast.Name):
            return None
        if call.func.id in mod.functions:
            return mod, mod.functions[call.func.id]
        if call.func.id in mod.sibling_imports:
            other_name, fn = mod.sibling_imports[call.func.id]
            other = self.module(other_name)
            if fn in other.functions:
                return other, other.functions[fn]
        return None


@dataclass
class _Uses:
    reads: dict[str, set[str]]
    optional_reads: dict[str, set[str]]
    writes: dict[str, set[str]]
    whole_namespace: set[str]
    unresolved_calls: set[str]
    add_argument_calls: list[tuple[str, ast.Call]]
    fallbacks: list[dict[str, Any]]
    functions: set[str]


def _is_var(node: ast.AST, var: str) -> bool:
    return isinstance(node, ast.Name) and node.id == var


def _walk_var(ex: _Examples, mod: _Module, func: ast.FunctionDef, var: str, uses: _Uses, seen: set) -> None:
    """Everything done to variable ``var`` inside ``func``, following calls that pass it on."""
    key = (mod.name, func.name, var)
    if key in seen:
        return
    seen.add(key)
    where = f"{mod.name}.{func.name}"
    uses.functions.add(where)
    for node in ast.walk(func):
        if isinstance(node, ast.Attribute) and _is_var(node.value, var):
            bucket = uses.writes if isinstance(node.ctx, (ast.Store, ast.Del)) else uses.reads
            if not (isinstance(node.ctx, ast.Load) and node.attr == "add_argument"):
                bucket.setdefault(node.attr, set()).add(where)
        elif isinstance(node, ast.If):
            # `if args.X is None: args.X = <literal>` -- a documented fallback
            t = node.test
            if (
                isinstance(t, ast.Compare)
                and isinstance(t.left, ast.Attribute)
                and _is_var(t.left.value, var)
                and len(t.ops) == 1
                and isinstance(t.ops[0], ast.Is)
                and isinstance(t.comparators[0], ast.Constant)
                and t.comparators[0].value is None
            ):
                for stmt in node.body:
                    if (
                        isinstance(stmt, ast.Assign)
                        and len(stmt.targets) == 1
                        and isinstance(stmt.targets[0], ast.Attribute)
                        and _is_var(stmt.targets[0].value, var)
                        and stmt.targets[0].attr == t.left.attr
                    ):
                        with contextlib.suppress(ValueError):
                            uses.fallbacks.append(
                                {
                                    "attribute": t.left.attr,
                                    "when": "is None",
                                    "value": ast.literal_eval(stmt.value),
                                    "in": where,
                                }
                            )
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr == "add_argument" and _is_var(f.value, var):
            uses.add_argument_calls.append((where, node))
            continue
        if isinstance(f, ast.Name) and f.id in ("getattr", "hasattr", "setattr") and node.args:
            if _is_var(node.args[0], var) and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant):
                name = node.args[1].value
                if f.id == "setattr":
                    uses.writes.setdefault(name, set()).add(where)
                elif f.id == "getattr" and len(node.args) == 2:
                    uses.reads.setdefault(name, set()).add(where)
                else:
                    uses.optional_reads.setdefault(name, set()).add(where)
            continue
        if isinstance(f, ast.Name) and f.id == "vars" and node.args and _is_var(node.args[0], var):
            uses.whole_namespace.add(where)
            continue
        passed = [i for i, a in enumerate(node.args) if _is_var(a, var)]
        passed_kw = [k.arg for k in node.keywords if _is_var(k.value, var) and k.arg]
        if not passed and not passed_kw:
            continue
        target = ex.resolve(mod, node)
        if target is None:
            uses.unresolved_calls.add(f"{where} -> {ast.unparse(node.func)}")
            continue
        tmod, tfunc = target
        params = [a.arg for a in tfunc.args.posonlyargs + tfunc.args.args]
        for i in passed:
            if i < len(params):
                _walk_var(ex, tmod, tfunc, params[i], uses, seen)
        for k in passed_kw:
            _walk_var(ex, tmod, tfunc, k, uses, seen)


def _new_uses() -> _Uses:
    return _Uses({}, {}, {}, set(), set(), [], [], set())


def _literal_or_expr(node: ast.AST) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError:
        return {"expr": ast.unparse(node)}


def _flag_record(where: str, call: ast.Call) -> dict[str, Any]:
    option_strings = []
    for a in call.args:
        if not (isinstance(a, ast.Constant) and isinstance(a.value, str)):
            raise ContractError(f"{where}: add_argument with a non-literal option string {ast.unparse(a)}")
        option_strings.append(a.value)
    kw = {k.arg: k.value for k in call.keywords if k.arg}
    action = "store"
    if "action" in kw:
        a = kw["action"]
        if isinstance(a, ast.Constant):
            action = a.value
        elif isinstance(a, ast.Attribute):
            action = a.attr
        else:
            raise ContractError(f"{where}: unrecognised action {ast.unparse(a)}")
    if "dest" in kw:
        dest = ast.literal_eval(kw["dest"])
    else:
        longs = [s for s in option_strings if s.startswith("--")]
        dest = (longs or option_strings)[0].lstrip("-").replace("-", "_")
    if "default" in kw:
        default = _literal_or_expr(kw["default"])
    else:
        default = {"store_true": False, "store_false": True}.get(action)
    if action == "BooleanOptionalAction":
        option_strings += ["--no-" + s[2:] for s in option_strings if s.startswith("--")]
    type_ = kw.get("type")
    return {
        "dest": dest,
        "option_strings": option_strings,
        "action": action,
        "type": None if type_ is None else ast.unparse(type_),
        "default": default,
        "nargs": None if "nargs" not in kw else _literal_or_expr(kw["nargs"]),
        "choices": None if "choices" not in kw else _literal_or_expr(kw["choices"]),
        "required": bool(ast.literal_eval(kw["required"])) if "required" in kw else False,
        "defined_in": where,
    }


def _args_attr(node: ast.AST) -> str | None:
    if isinstance(node, ast.Attribute) and _is_var(node.value, "args"):
        return node.attr
    return None


def _classify_conversion(attr: str, value: ast.AST) -> dict[str, Any]:
    """The two shapes hf_ptq's __main__ uses; anything else stops the extractor."""

    def split_of(node: ast.AST) -> str | None:
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "split"
            and _args_attr(node.func.value) == attr
            and len(node.args) == 1
            and isinstance(node.args[0], ast.Constant)
        ):
            return node.args[0].value
        return None

    # args.X = args.X.split(SEP) if isinstance(args.X, str) else args.X
    if isinstance(value, ast.IfExp) and split_of(value.body) is not None and _args_attr(value.orelse) == attr:
        t = value.test
        if (
            isinstance(t, ast.Call)
            and isinstance(t.func, ast.Name)
            and t.func.id == "isinstance"
            and _args_attr(t.args[0]) == attr
            and ast.unparse(t.args[1]) == "str"
        ):
            return {
                "attribute": attr,
                "from": "str",
                "to": "list[str]",
                "split_on": split_of(value.body),
                "element": "str",
                "only_if_str": True,
                "otherwise": "unchanged",
            }
    # args.X = [int(v) for v in args.X.split(SEP)]
    if isinstance(value, ast.ListComp) and len(value.generators) == 1:
        gen = value.generators[0]
        elt = value.elt
        if (
            split_of(gen.iter) is not None
            and isinstance(elt, ast.Call)
            and isinstance(elt.func, ast.Name)
            and elt.func.id in ("int", "float", "str")
            and len(elt.args) == 1
            and isinstance(gen.target, ast.Name)
            and _is_var(elt.args[0], gen.target.id)
        ):
            return {
                "attribute": attr,
                "from": "str",
                "to": f"list[{elt.func.id}]",
                "split_on": split_of(gen.iter),
                "element": elt.func.id,
                "only_if_str": False,
                "otherwise": "AttributeError (not a str)",
            }
    raise ContractError(f"__main__: unrecognised conversion of args.{attr}: {ast.unparse(value)[:80]}")


def _classify_guard(node: ast.If) -> dict[str, Any]:
    test = (
        node.test.values[0]
        if isinstance(node.test, ast.BoolOp) and isinstance(node.test.op, ast.And)
        else node.test
    )
    gate: dict[str, Any] | None = None
    if _args_attr(test):
        gate = {"attribute": _args_attr(test), "inert_if": "falsy"}
    elif isinstance(test, ast.Compare) and len(test.ops) == 1 and _args_attr(test.left):
        op, rhs = test.ops[0], test.comparators[0]
        if isinstance(op, ast.IsNot) and isinstance(rhs, ast.Constant) and rhs.value is None:
            gate = {"attribute": _args_attr(test.left), "inert_if": "is None"}
        elif isinstance(op, ast.NotEq) and isinstance(rhs, ast.Constant):
            gate = {"attribute": _args_attr(test.left), "inert_if": {"equals": rhs.value}}
    if gate is None:
        raise ContractError(f"__main__: unrecognised guard `if {ast.unparse(node.test)[:80]}`")
    effects = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Raise) and sub.exc is not None:
            exc = sub.exc.func if isinstance(sub.exc, ast.Call) else sub.exc
            effects.add(f"raises {ast.unparse(exc)}")
        if isinstance(sub, ast.Call) and ast.unparse(sub.func) in ("warnings.warn", "warn"):
            effects.add("warns")
    if not effects:
        raise ContractError(f"__main__: guard on args.{gate['attribute']} neither raises nor warns")
    reads = sorted({n.attr for n in ast.walk(node) if _args_attr(n)})
    return {"gate": gate, "effect": ", ".join(sorted(effects)), "reads": reads}


def _main_block(tree: ast.Module) -> dict[str, Any]:
    blocks = [
        n
        for n in tree.body
        if isinstance(n, ast.If)
        and ast.unparse(n.test) in ('__name__ == "__main__"', "__name__ == '__main__'")
    ]
    if len(blocks) != 1:
        raise ContractError(f"expected one `if __name__ == '__main__':` block, found {len(blocks)}")
    steps, conversions, guards = [], [], []
    for stmt in blocks[0].body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and _is_var(stmt.targets[0], "args"):
            if ast.unparse(stmt.value) != "parse_args()":
                raise ContractError(f"__main__: args comes from {ast.unparse(stmt.value)}")
            steps.append("parse_args")
        elif isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and _args_attr(stmt.targets[0]):
            conversions.append(_classify_conversion(_args_attr(stmt.targets[0]), stmt.value))
            steps.append(f"convert {_args_attr(stmt.targets[0])}")
        elif isinstance(stmt, ast.If):
            guards.append(_classify_guard(stmt))
            steps.append(f"guard {guards[-1]['gate']['attribute']}")
        elif isinstance(stmt, ast.Expr) and ast.unparse(stmt.value) == "main(args)":
            steps.append("main(args)")
        else:
            raise ContractError(f"__main__: unrecognised statement at line {stmt.lineno}")
    if steps[0] != "parse_args" or steps[-1] != "main(args)":
        raise ContractError(f"__main__: expected parse_args() first and main(args) last, got {steps}")
    return {"steps": steps, "conversions": conversions, "guards": guards}


def _sorted_map(d: Mapping[str, set[str]]) -> dict[str, list[str]]:
    return {k: sorted(v) for k, v in sorted(d.items())}


def _git_commit(path: Path) -> str | None:
    import subprocess

    try:
        out = subprocess.run(
            ["git", "-C", str(path.parent), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def extract_contract(
    hf_ptq_path: Path, *, commit: str | None = None, note: str | None = None, resolve_runtime: bool = False
) -> dict[str, Any]:
    """Read hf_ptq.py (and the sibling example modules it hands ``parser``/``args`` to) and return the
    contract the driver relies on. ``commit`` names the ModelOpt commit the file came from (else taken
    from git when the file is in a work tree). ``resolve_runtime`` imports hf_ptq (needs ModelOpt) to
    check the live parser against the tree and to record values the tree only has as expressions."""
    hf_ptq_path = Path(hf_ptq_path).resolve()
    ex = _Examples(hf_ptq_path)
    root = ex.root
    for needed in ("parse_args", "main"):
        if needed not in root.functions:
            raise ContractError(f"{hf_ptq_path}: defines no {needed}()")

    parser_uses, seen = _new_uses(), set()
    _walk_var(ex, root, root.functions["parse_args"], "parser", parser_uses, seen)
    flags = [_flag_record(where, call) for where, call in parser_uses.add_argument_calls]
    dests = [f["dest"] for f in flags]
    if len(set(dests)) != len(dests):
        raise ContractError(f"{hf_ptq_path}: a dest is defined twice: {sorted(dests)}")

    parse_uses = _new_uses()
    _walk_var(ex, root, root.functions["parse_args"], "args", parse_uses, set())
    added_by_parse_args = sorted(set(parse_uses.writes) - set(dests))

    main_uses = _new_uses()
    _walk_var(ex, root, root.functions["main"], "args", main_uses, set())
    available = set(dests) | set(added_by_parse_args)
    introduced_by_main = sorted(set(main_uses.writes) - available)
    required = sorted(set(main_uses.reads) - set(introduced_by_main))

    siblings = {name: m.path for name, m in sorted(ex.modules.items())}
    contract: dict[str, Any] = {
        "schema": CONTRACT_SCHEMA,
        "produced_by": (
            "pipeline.hf_ptq.extract_contract: Python syntax tree of hf_ptq.py and the sibling example "
            "modules it passes `parser`/`args` to (no import). flags: every parser.add_argument call reached "
            "from parse_args(); main_block: the statements of `if __name__ == '__main__':` classified as "
            "conversions/guards; main_reads: attribute reads of `args` in main() and, transitively, in every "
            "hf_ptq/sibling function it passes `args` to (positionally or by keyword), including getattr/"
            "hasattr; 'required' excludes attributes main's reach itself assigns before use (introduced_by_main) "
            "and getattr-with-default reads (optional). Not followed: calls into modelopt/transformers "
            "(listed in unresolved_calls)."
        ),
        "source": {
            "repository": "github.com/NVIDIA/Model-Optimizer",
            "commit": commit or _git_commit(hf_ptq_path),
            "note": note,
            "path": str(hf_ptq_path.relative_to(hf_ptq_path.parents[2])),
            "sha256": {name: hashlib.sha256(p.read_bytes()).hexdigest() for name, p in siblings.items()},
        },
        "flags": flags,
        "added_by_parse_args": added_by_parse_args,
        "main_block": _main_block(root.tree),
        "main_reads": {
            "required": required,
            "optional": sorted(set(main_uses.optional_reads) - set(main_uses.reads)),
            "introduced_by_main": introduced_by_main,
            "read_in": _sorted_map({k: v for k, v in main_uses.reads.items() if k in required}),
            "whole_namespace_uses": sorted(main_uses.whole_namespace),
            "functions_walked": sorted(main_uses.functions),
            "unresolved_calls": sorted(main_uses.unresolved_calls),
        },
        "fallbacks": sorted(
            ({k: v for k, v in fb.items()} for fb in main_uses.fallbacks), key=lambda fb: fb["attribute"]
        ),
    }
    if resolve_runtime:
        contract["runtime"] = _resolve_runtime(hf_ptq_path, contract)
    return contract


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


def _resolve_runtime(hf_ptq_path: Path, contract: dict[str, Any]) -> dict[str, Any]:
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


def contract_diff(recorded: Mapping[str, Any], fresh: Mapping[str, Any]) -> list[str]:
    """Human-readable differences, ignoring provenance (``produced_by``, ``source``)."""
    out: list[str] = []

    def walk(a: Any, b: Any, where: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                if where == "" and k in ("produced_by", "source"):
                    continue
                if k not in a:
                    out.append(f"{where}/{k}: new {b[k]!r}"[:300])
                elif k not in b:
                    out.append(f"{where}/{k}: gone (was {a[k]!r})"[:300])
                else:
                    walk(a[k], b[k], f"{where}/{k}")
        elif where == "/flags" and isinstance(a, list) and isinstance(b, list):
            walk({f["dest"]: f for f in a}, {f["dest"]: f for f in b}, where)
        elif a != b:
            out.append(f"{where}: recorded {a!r} -> now {b!r}"[:300])

    walk(json.loads(json.dumps(recorded)), json.loads(json.dumps(fresh)), "")
    return out


def _main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pipeline.hf_ptq", description="Regenerate the recorded hf_ptq contract."
    )
    ap.add_argument("repo", type=Path, help="a ModelOpt checkout (git clone of NVIDIA/Model-Optimizer)")
    ap.add_argument("--commit", help="the checkout's commit, when it is not a git work tree")
    ap.add_argument("--note", help="where the checkout came from / how it relates to the installed wheel")
    ap.add_argument("--out", type=Path, default=CONTRACT_PATH)
    ap.add_argument("--no-runtime", action="store_true", help="do not import hf_ptq (no ModelOpt here)")
    ns = ap.parse_args(argv)
    contract = extract_contract(
        locate_hf_ptq(ns.repo), commit=ns.commit, note=ns.note, resolve_runtime=not ns.no_runtime
    )
    ns.out.write_text(json.dumps(contract, indent=1, sort_keys=False) + "\n")
    print(f"wrote {ns.out}: {len(contract['flags'])} flags, {len(contract['main_reads']['required'])} attrs")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
