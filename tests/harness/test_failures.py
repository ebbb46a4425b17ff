"""The failure catalogue (harness/failures.py, docs/failures.md): the list of failures is what the seeds'
notes record (fixtures/seed_failures.json, re-extracted from ../shared/seeds when present), no failure
without a row, no row without tests, no named test that does not exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from harness.failures import (
    CATALOGUE,
    FINDINGS,
    SEED_FAILURES,
    SEED_NOTES,
    extract_seed_failures,
    markdown,
    recorded_seed_failures,
)

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.reference
def test_the_recorded_failure_list_is_what_the_notes_record():
    """Re-extract from the notes themselves; a note edited, added or a rule changed shows up as a diff
    (regenerate fixtures/seed_failures.json with harness.failures.extract_seed_failures, then add rows)."""
    assert extract_seed_failures(SEED_NOTES) == recorded_seed_failures()


def test_the_recorded_list_names_every_kind_the_notes_hold():
    """The committed list is not trimmed to the Run/S numbering: the config patches and the other
    failures of the bug lists are in it, each quoting the line of the note that records it."""
    recorded = recorded_seed_failures()
    ids = [f["id"] for f in recorded]
    assert {f"Run {i}" for i in range(1, 12)} | {f"S{i}" for i in range(1, 16)} | {"S13.5"} <= set(ids)
    assert {f"Config {i}" for i in range(1, 5)} <= set(ids)
    assert {"low_memory_mode", "calib_size=256", "kernels package", "w1/w3 weight_scale_2"} <= set(ids)
    assert all(f["line"] and f["note"].endswith(".txt") for f in recorded)


def test_every_seed_failure_has_a_row_with_tests():
    ids = [f.id for f in CATALOGUE]
    assert len(ids) == len(set(ids))
    assert set(ids) == set(SEED_FAILURES), sorted(set(SEED_FAILURES) ^ set(ids))
    for f in CATALOGUE:
        assert f.tests and f.what and f.tier and f.fires, f.id


def test_every_finding_has_tests_and_a_unique_id():
    ids = [f.id for f in (*CATALOGUE, *FINDINGS)]
    assert len(ids) == len(set(ids))
    for f in FINDINGS:
        assert f.tests and f.what and f.tier and f.fires, f.id


@pytest.mark.parametrize("failure", (*CATALOGUE, *FINDINGS), ids=lambda f: f.id)
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
