"""The failure catalogue (harness/failures.py, docs/failures.md): no seed failure without a row, no row
without tests, no named test that does not exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from harness.failures import CATALOGUE, SEED_FAILURES, markdown

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


def test_every_seed_failure_has_a_row_with_tests():
    ids = [f.id for f in CATALOGUE]
    assert len(ids) == len(set(ids))
    assert set(ids) == set(SEED_FAILURES), sorted(set(SEED_FAILURES) ^ set(ids))
    for f in CATALOGUE:
        assert f.tests and f.what and f.tier and f.fires, f.id


@pytest.mark.parametrize("failure", CATALOGUE, ids=lambda f: f.id)
def test_every_named_test_exists(failure):
    for node in failure.tests:
        path, _, name = node.partition("::")
        source = (ROOT / path).read_text()  # FileNotFoundError names a missing file
        if name:
            assert re.search(rf"^def {re.escape(name)}\(", source, flags=re.M), f"{failure.id}: {node}"
        else:
            assert re.search(r"^def test_", source, flags=re.M), f"{failure.id}: {path} has no tests"


def test_docs_equal_the_generated_catalogue():
    assert (ROOT / "docs" / "failures.md").read_text() == markdown(), (
        "regenerate docs/failures.md (see its header)"
    )
