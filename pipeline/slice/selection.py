"""Which layers and experts `dsv4 slice` keeps, and the config.json that says so; torch-free, so that
`dsv4 slice --help` reads its defaults here without loading a step (the rule: pipeline/slice/__init__.py).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

from pipeline.errors import DsV4Error
from pipeline.release_layout import compress_ratio

STEP = "dsv4 slice"
REPORT_NAME = "dsv4-slice-report.json"
DEFAULT_LAYERS = 2
DEFAULT_EXPERTS = 8

# Block kinds a layer selection tries to cover, highest priority first; weights 16, 8, 4, 2, 1 make any
# kind outweigh all kinds below it together.
KINDS: tuple[str, ...] = ("hash", "csa", "topk", "hca", "sliding")
_WEIGHT = {kind: 1 << (len(KINDS) - 1 - i) for i, kind in enumerate(KINDS)}


def parse_layers(text: str) -> int | tuple[int, ...]:
    """``"2"`` -> 2 (a count); ``"0,3"`` (or ``"5,"`` for one layer) -> (0, 3): layers by number."""
    text = text.strip()
    if "," not in text:
        try:
            count = int(text)
        except ValueError:
            raise DsV4Error(f"--layers {text!r}: a count (e.g. 2) or layer numbers (e.g. 0,3)") from None
        return count
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise DsV4Error(f"--layers {text!r}: layer numbers are integers separated by commas") from None


def layer_kinds(config: Mapping, layer: int) -> frozenset[str]:
    """The kinds of ``layer``: its routing (hash or topk) and its attention (csa, hca or sliding)."""
    routing = "hash" if layer < int(config.get("num_hash_layers", 0)) else "topk"
    ratio = compress_ratio(config, layer)
    attention = "sliding" if ratio <= 1 else "csa" if ratio == 4 else "hca"
    return frozenset((routing, attention))


def _score(config: Mapping, layers: Sequence[int]) -> int:
    covered = set().union(*(layer_kinds(config, n) for n in layers)) if layers else set()
    return sum(_WEIGHT[k] for k in covered)


def select_layers(config: Mapping, layers: int | Sequence[int]) -> tuple[int, ...]:
    """The release layers to keep, ascending (see the module docstring for the rule)."""
    total = int(config["num_hidden_layers"])
    if isinstance(layers, int):
        if not 1 <= layers <= total:
            raise DsV4Error(f"--layers {layers}: the source has {total} layer(s); keep between 1 and {total}")
        # Layers with the same kinds are interchangeable for coverage: only the earliest of each matters.
        first_of: dict[frozenset[str], int] = {}
        for n in range(total):
            first_of.setdefault(layer_kinds(config, n), n)
        candidates = set()
        for r in range(min(layers, len(first_of)) + 1):
            for picks in itertools.combinations(first_of.values(), r):
                fill = [n for n in range(total) if n not in picks][: layers - r]
                candidates.add(tuple(sorted((*picks, *fill))))
        return min(candidates, key=lambda chosen: (-_score(config, chosen), chosen))
    chosen = tuple(int(n) for n in layers)
    if not chosen:
        raise DsV4Error("--layers: name at least one layer")
    bad = [n for n in chosen if not 0 <= n < total]
    if bad:
        raise DsV4Error(
            f"--layers {','.join(map(str, chosen))}: layer(s) {bad} do not exist (0..{total - 1})"
        )
    if len(set(chosen)) != len(chosen):
        raise DsV4Error(f"--layers {','.join(map(str, chosen))}: a layer is named twice")
    return tuple(sorted(chosen))


def sliced_config(config: Mapping, layers: Sequence[int], experts: int) -> dict:
    """config.json of the slice: layer count, expert count, hash layers and compress ratios rewritten."""
    total = int(config["num_hidden_layers"])
    n_experts = int(config["n_routed_experts"])
    top_k = int(config["num_experts_per_tok"])
    if not 1 <= experts <= n_experts:
        raise DsV4Error(
            f"--experts {experts}: the source has {n_experts} routed experts per layer; keep between 1 and "
            f"{n_experts}"
        )
    if experts < top_k:
        raise DsV4Error(
            f"--experts {experts}: each token is routed to num_experts_per_tok = {top_k} experts; keep at "
            f"least {top_k} (the routing width is part of what the slice tests)"
        )
    out = dict(config)
    out["num_hidden_layers"] = len(layers)
    out["n_routed_experts"] = experts
    out["num_hash_layers"] = sum(n < int(config.get("num_hash_layers", 0)) for n in layers)
    ratios = config.get("compress_ratios")
    if ratios is not None:
        out["compress_ratios"] = [ratios[n] for n in layers] + list(ratios[total:])
    for key in ("layer_types", "mlp_layer_types"):  # per-layer lists of transformers-style configs
        value = config.get(key)
        if isinstance(value, list) and len(value) == total:
            out[key] = [value[n] for n in layers]
    return out


__all__ = [
    "DEFAULT_EXPERTS",
    "DEFAULT_LAYERS",
    "KINDS",
    "REPORT_NAME",
    "STEP",
    "layer_kinds",
    "parse_layers",
    "select_layers",
    "sliced_config",
]
