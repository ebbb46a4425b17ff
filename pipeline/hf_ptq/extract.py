"""The contract from a real hf_ptq.py's syntax tree (no import needed): its flags, the ``__main__``
conversions and guards as data, and the attributes of ``args`` that ``main()`` and the functions it
hands ``args`` to read."""

from __future__ import annotations

import ast
import contextlib
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .contract import CONTRACT_SCHEMA, ContractError
from .main_block import is_var, read_main_block
from .runtime import resolve_runtime_values


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


def _walk_var(ex: _Examples, mod: _Module, func: ast.FunctionDef, var: str, uses: _Uses, seen: set) -> None:
    """Everything done to variable ``var`` inside ``func``, following calls that pass it on."""
    key = (mod.name, func.name, var)
    if key in seen:
        return
    seen.add(key)
    where = f"{mod.name}.{func.name}"
    uses.functions.add(where)
    for node in ast.walk(func):
        if isinstance(node, ast.Attribute) and is_var(node.value, var):
            bucket = uses.writes if isinstance(node.ctx, (ast.Store, ast.Del)) else uses.reads
            if not (isinstance(node.ctx, ast.Load) and node.attr == "add_argument"):
                bucket.setdefault(node.attr, set()).add(where)
        elif isinstance(node, ast.If):
            # `if args.X is None: args.X = <literal>` -- a documented fallback
            t = node.test
            if (
                isinstance(t, ast.Compare)
                and isinstance(t.left, ast.Attribute)
                and is_var(t.left.value, var)
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
                        and is_var(stmt.targets[0].value, var)
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
        if isinstance(f, ast.Attribute) and f.attr == "add_argument" and is_var(f.value, var):
            uses.add_argument_calls.append((where, node))
            continue
        if isinstance(f, ast.Name) and f.id in ("getattr", "hasattr", "setattr") and node.args:
            if is_var(node.args[0], var) and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant):
                name = node.args[1].value
                if f.id == "setattr":
                    uses.writes.setdefault(name, set()).add(where)
                elif f.id == "getattr" and len(node.args) == 2:
                    uses.reads.setdefault(name, set()).add(where)
                else:
                    uses.optional_reads.setdefault(name, set()).add(where)
            continue
        if isinstance(f, ast.Name) and f.id == "vars" and node.args and is_var(node.args[0], var):
            uses.whole_namespace.add(where)
            continue
        passed = [i for i, a in enumerate(node.args) if is_var(a, var)]
        passed_kw = [k.arg for k in node.keywords if is_var(k.value, var) and k.arg]
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
        "main_block": read_main_block(root.tree),
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
        contract["runtime"] = resolve_runtime_values(hf_ptq_path, contract)
    return contract
