"""hf_ptq.py's ``if __name__ == "__main__":`` block read from its syntax tree: parse_args() first,
main(args) last, and in between the conversions and guards (as data the driver replays)."""

from __future__ import annotations

import ast
from typing import Any

from .contract import ContractError


def is_var(node: ast.AST, var: str) -> bool:
    return isinstance(node, ast.Name) and node.id == var


def _args_attr(node: ast.AST) -> str | None:
    if isinstance(node, ast.Attribute) and is_var(node.value, "args"):
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
            and is_var(elt.args[0], gen.target.id)
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


def read_main_block(tree: ast.Module) -> dict[str, Any]:
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
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and is_var(stmt.targets[0], "args"):
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
