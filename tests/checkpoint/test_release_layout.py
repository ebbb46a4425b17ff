"""The release layout derived from config.json reproduces the real V4 Pro tensor table exactly."""

import gzip
import json

import pytest

from harness import replica
from harness.markers import require_reference
from pipeline.release_layout import FP8, MXFP4, layer_kind, release_tensors, release_weights

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def reference():
    require_reference("the check of release_layout against the real V4 Pro table")  # CI: fails, never skips
    config = json.loads(replica.REFERENCE_CONFIG.read_text())
    with gzip.open(replica.WEIGHTS_TSV, "rt") as fh:
        rows = [line.rstrip("\n").split("\t") for line in fh][1:]
    table = {
        key: (dtype, tuple(int(d) for d in shape.split("x")) if shape else ())
        for key, dtype, shape, _ in rows
    }
    return config, table


@pytest.fixture(scope="module")
def spec(reference):
    """release_tensors of the real config, computed once for the module (145,116 entries)."""
    return list(release_tensors(reference[0]))


def test_spec_reproduces_every_v4_pro_tensor(reference, spec):
    _, table = reference
    ours = {t.key: (t.dtype, t.shape) for t in spec}
    assert len(ours) == len(table) == 145_116
    missing, extra = table.keys() - ours.keys(), ours.keys() - table.keys()
    assert not missing and not extra, (sorted(missing)[:5], sorted(extra)[:5])
    wrong = {k: (ours[k], table[k]) for k in table if ours[k] != table[k]}
    assert not wrong, list(wrong.items())[:5]


def test_v4_pro_element_count_matches_the_published_total(spec):
    # elements of the stored tensors, as the hub counts them (packed int8 counts one per byte)
    total = 0
    for t in spec:
        n = 1
        for d in t.shape:
            n *= d
        total += n
    assert total == 861_608_274_846


def test_layer_kinds_of_v4_pro(reference):
    config, _ = reference
    kinds = [layer_kind(config, i) for i in range(config["num_hidden_layers"] + 1)]
    assert kinds[:4] == ["hca", "hca", "csa", "hca"]
    assert kinds[-1] == "sliding"  # the MTP block
    assert kinds.count("csa") == 30


def test_formats_per_weight(reference):
    config, _ = reference
    fmts = {w.name: w.fmt for w in release_weights(config)}
    assert fmts["layers.0.ffn.experts.0.w1"] == MXFP4
    assert fmts["layers.0.attn.wo_a"] == FP8
    assert fmts["layers.2.attn.indexer.wq_b"] == FP8
    assert fmts["mtp.0.e_proj"] == FP8
    assert fmts["layers.2.attn.indexer.weights_proj.weight"] not in (FP8, MXFP4)


@pytest.mark.parametrize("ci", ["true", ""])
def test_without_the_reference_ci_fails_where_a_fresh_clone_skips(ci, monkeypatch, tmp_path):
    """These tests are the only check of release_layout against the real V4 Pro table: on CI (tox passes
    CI through) a missing ../shared must fail the run, not quietly skip them; a user's clone skips."""
    from harness import markers

    monkeypatch.setattr(replica, "WEIGHTS_TSV", tmp_path / "absent.tsv.gz")
    monkeypatch.setenv("CI", ci)
    monkeypatch.delenv("DSV4_REQUIRE", raising=False)
    assert ("reference" in markers.required_tiers()) == bool(ci)
    outcome = None
    try:
        markers.require_reference("this check")
    except (
        pytest.fail.Exception,
        pytest.skip.Exception,
    ) as exc:  # catch both: a skip must not pass as a fail
        outcome = exc
    assert outcome is not None, "require_reference returned although the reference is absent"
    expected = pytest.fail.Exception if ci else pytest.skip.Exception
    assert type(outcome) is expected, f"{type(outcome).__name__}: {outcome.msg}"
    assert "absent.tsv.gz" in outcome.msg
