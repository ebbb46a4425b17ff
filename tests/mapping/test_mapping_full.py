"""pipeline.mapping at full V4 Pro scale (../shared/reference/deepseek-v4-pro/config.json).

* Per-key snapshots for one full-size block of each kind — hash-routed (layer 0), top-k CSA, top-k
  HCA, MTP — in dialects N (the target layout), H and X (a full-recipe ModelOpt export, derived by
  the inverse functions of harness/exports.py). Routed experts are shown for the first and
  the last expert; the test checks every other expert maps the same way up to its index.
* A compact table over every key — the 145,116 tensors of the release as it is, and the converted
  layout's keys in dialects N, H and X (both recipes) — per block kind, rule and action: counts,
  source dtypes and shapes, one example key. A version change of the rules shows as a reviewable diff.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import pytest
from syrupy.extensions.json import JSONSnapshotExtension

from harness.exports import export_tensors
from harness.markers import require_reference
from pipeline import mapping as M
from pipeline.release_layout import compress_ratio, layer_kind, release_tensors
from tests.mapping.test_mapping import _dims, snapshot_rows

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).resolve().parents[3] / "shared" / "reference" / "deepseek-v4-pro" / "config.json"
RELEASE_KEYS = 145_116


@pytest.fixture(scope="module")
def config() -> dict:
    require_reference("the full-scale mapping tests")  # CI: fails, never skips
    return json.loads(CONFIG.read_text())


@pytest.fixture
def json_snapshot(snapshot):
    return snapshot.use_extension(JSONSnapshotExtension)


def block_of(native: str, config: dict) -> str:
    """'top', 'mtp.J', or 'layers.N' of a native key."""
    m = re.match(r"(layers|mtp)\.(\d+)\.", native)
    return "top" if m is None else f"{m.group(1)}.{m.group(2)}"


def kind_of(block: str, config: dict) -> str:
    """top / mtp / {hash,topk}-{csa,hca,sliding}: routing and attention kind of a block."""
    if block == "top" or block.startswith("mtp."):
        return block.split(".")[0]
    i = int(block.split(".")[1])
    routing = "hash" if i < config.get("num_hash_layers", 0) else "topk"
    return f"{routing}-{layer_kind(config, i)}"


def representative_blocks(config: dict) -> dict[str, str]:
    layers = config["num_hidden_layers"]
    hashed = config["num_hash_layers"]
    topk = [i for i in range(hashed, layers)]
    return {
        "hash": "layers.0",
        "csa": f"layers.{next(i for i in topk if compress_ratio(config, i) == 4)}",
        "hca": f"layers.{next(i for i in topk if compress_ratio(config, i) == 128)}",
        "mtp": "mtp.0",
    }


def _inputs(config: dict, dialect: str, recipe: str = "full"):
    if dialect == "N":
        return [(t.key, t.dtype, t.shape) for t in M.target_tensors(config)]
    return export_tensors(config, recipe, dialect)


@pytest.fixture(scope="module")
def layout(config) -> dict[str, M.TargetTensor]:
    return M.target_layout(config)


@pytest.fixture(scope="module")
def plans(config):
    """(dialect, recipe) -> (number of input tensors, Plan), each computed once for the module."""
    cache: dict[tuple[str, str], tuple[int, M.Plan]] = {}

    def get(dialect: str, recipe: str = "full") -> tuple[int, M.Plan]:
        if (dialect, recipe) not in cache:
            tensors = _inputs(config, dialect, recipe)
            cache[(dialect, recipe)] = (len(tensors), M.plan(tensors, config, dialect))
        return cache[(dialect, recipe)]

    return get


_EXPERT_INDEX = re.compile(r"(\.experts\.)(\d+)(\.)")


@pytest.mark.parametrize("kind", ["hash", "csa", "hca", "mtp"])
@pytest.mark.parametrize("dialect", ["N", "H", "X"])
def test_snapshot_full_size_block(config, plans, layout, dialect, kind, json_snapshot):
    block = representative_blocks(config)[kind]
    _, full = plans(dialect)
    if dialect != "N" and kind == "mtp":
        # H/X exports have no MTP block: the plan lists its target keys as absent, with why
        last = str(config["n_routed_experts"] - 1)
        absent = [(k, why) for k, why in full.absent if k.startswith(f"{block}.")]
        assert len(absent) == sum(1 for k in M.target_layout(config) if k.startswith(f"{block}."))
        shown = [
            (k, w)
            for k, w in absent
            if not _EXPERT_INDEX.search(k) or _EXPERT_INDEX.search(k).group(2) in ("0", last)
        ]
        rows = snapshot_rows(M.Plan(dialect, [], shown), config, {})
        assert rows
        assert rows == json_snapshot
        return
    last = config["n_routed_experts"] - 1
    p = M.Plan(dialect, [m for m in full.mappings if block_of(m.target, config) == block])
    # every expert maps like expert 0, up to its index
    by_expert: dict[str, set[str]] = defaultdict(set)
    rows = snapshot_rows(p, config, layout)
    for row in rows:
        m = _EXPERT_INDEX.search(row)
        if m:
            by_expert[m.group(2)].add(_EXPERT_INDEX.sub(r"\1#\3", row))
    assert len(by_expert) == config["n_routed_experts"]
    assert all(rows == by_expert["0"] for rows in by_expert.values())
    shown = [
        r for r in rows if not _EXPERT_INDEX.search(r) or _EXPERT_INDEX.search(r).group(2) in ("0", str(last))
    ]
    assert shown == json_snapshot


def compact_table(mappings: list[M.Mapping], config: dict) -> list[str]:
    groups: dict[tuple[str, str, str], list[M.Mapping]] = defaultdict(list)
    for m in mappings:
        groups[(kind_of(block_of(m.target, config), config), m.rule, m.action or "?")].append(m)
    rows = []
    for (kind, rule, action), ms in sorted(groups.items()):
        dtypes = ",".join(sorted({m.dtype for m in ms}))
        shapes = " ".join(sorted({f"[{_dims(m.shape)}]" for m in ms}))
        rows.append(
            f"{kind} | {rule} | {action} | {len(ms)} | {dtypes} | {shapes} | e.g. {min(m.source for m in ms)}"
        )
    return rows


def test_compact_table_full_v4_pro(config, plans, json_snapshot):
    out: dict[str, list[str]] = {}
    release = list(release_tensors(config))
    assert len(release) == RELEASE_KEYS
    # the release as it ships: every key has an outcome (MXFP4 experts drop: NVFP4 comes from the export)
    out["N release (as shipped)"] = compact_table(
        [M.map_key(t.key, "N", t.dtype, t.shape) for t in release], config
    )
    for dialect, recipe in [("N", "-"), ("H", "full"), ("X", "full"), ("X", "experts")]:
        n, p = plans(dialect, "full" if recipe == "-" else recipe)
        target = M.target_layout(config)
        written = [w for m in p.mappings for w in m.writes]
        assert len(written) == len(set(written))
        assert set(written) | {k for k, _ in p.absent} == set(target)
        out[f"{dialect} {recipe}: {n} keys, {len(written)} written, {len(p.absent)} absent"] = compact_table(
            p.mappings, config
        )
    assert out == json_snapshot
