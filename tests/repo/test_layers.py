"""The package's layers (pipeline/layers.py) hold in the source: imports only go down or sideways,
no import cycle, every module in exactly one layer, and docs/layers.md is the table's rendering."""

from __future__ import annotations

from collections import defaultdict

import pytest

from harness import import_graph
from pipeline import layers

pytestmark = pytest.mark.unit


def test_every_module_is_in_a_layer():
    homeless = [name for name in import_graph.modules() if layers.layer_of(name) is None]
    assert not homeless, f"add these to pipeline.layers.LAYERS: {homeless}"


def test_every_layer_prefix_names_a_module():
    known = import_graph.modules()
    stale = [p for layer in layers.LAYERS for p in layer.modules if p not in known]
    assert not stale, f"pipeline.layers.LAYERS names modules that do not exist: {stale}"


def test_no_import_goes_up_a_layer():
    upward = [
        f"{edge}: {layers.layer_of(edge.importer).name} imports {layers.layer_of(edge.imported).name}"
        for edge in import_graph.edges()
        if layers.height(edge.imported) > layers.height(edge.importer)
    ]
    assert not upward, "imports that climb back up:\n" + "\n".join(upward)


def test_no_import_cycle_lazy_imports_included():
    graph: dict[str, set[str]] = defaultdict(set)
    for edge in import_graph.edges():
        graph[edge.importer].add(edge.imported)
    assert import_graph.cycles(graph) == []


def test_the_checks_see_an_upward_import_and_a_cycle():
    # the two checks above must be able to fail: a step importing the CLI is upward, and a pair of
    # modules importing each other is a cycle
    assert layers.height("pipeline.cli.convert") > layers.height("pipeline.dequant")
    assert import_graph.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_graph_finds_lazy_and_relative_imports():
    edges = {(e.importer, e.imported): e for e in import_graph.edges()}
    # pipeline/mapping/docs.py imports its siblings relatively (`from .rules import ...`)
    assert ("pipeline.mapping.docs", "pipeline.mapping.rules") in edges
    # the CLI imports its command's work inside the command's function, so `--help` stays light
    assert any(e.lazy for (importer, _), e in edges.items() if importer.startswith("pipeline.cli."))


def test_a_new_module_is_in_no_layer_until_it_is_placed():
    # the root packages own only their __init__, so a module nobody placed is reported, not absorbed
    assert layers.layer_of("pipeline") is not None
    assert layers.layer_of("pipeline.brand_new_module") is None
    assert layers.layer_of("patches.brand_new_patch") is None


def test_docs_page_is_the_table():
    doc = import_graph.ROOT / "docs" / "layers.md"
    assert doc.read_text() == layers.layers_markdown(), "regenerate docs/layers.md (see its header)"
