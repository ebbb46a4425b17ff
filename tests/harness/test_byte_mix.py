"""harness/byte_mix.py: the byte mix per tensor role that bench/stepbench.py builds its checkpoints on.

The mix of V4 Pro computed from its config is the mix of the real weight table, and the small
one-layer configs the bench builds stay within a stated share of bytes of it (nothing is timed)."""

from __future__ import annotations

import copy
import json

import pytest

from harness.byte_mix import (
    ROLES,
    bench_config,
    byte_mix,
    mix_distance,
    release_mix,
    release_specs,
    role,
    shares,
)
from harness.markers import require_reference
from harness.replica import REFERENCE_CONFIG, load_weights_table
from harness.tiny import _RELEASE_CONFIG

pytestmark = pytest.mark.unit

RELEASE_DATA_BYTES = 864_704_792_696  # tests/checkpoint/test_replica_validate.py


@pytest.mark.parametrize(
    ("key", "want"),
    [
        ("layers.7.ffn.experts.12.w2.scale", "routed experts"),
        ("mtp.0.ffn.experts.3.w1.weight", "routed experts"),
        ("layers.2.attn.indexer.compressor.wkv.weight", "attention"),
        ("layers.0.ffn.shared_experts.w3.weight_scale", "shared experts"),
        ("head.weight", "embed/head"),
        ("layers.5.ffn.gate.bias", "router"),
        ("layers.5.hc_ffn_fn", "norms/hc/mtp proj"),
        ("mtp.0.e_proj.weight", "norms/hc/mtp proj"),
    ],
)
def test_role(key, want):
    assert role(key) == want


def test_reference_mix_is_the_weight_tables():
    require_reference("the V4 Pro byte mix against the real weight table")
    table = byte_mix((k, d, s) for k, d, s, _ in load_weights_table())
    assert sum(table.values()) == RELEASE_DATA_BYTES
    assert table == release_mix(json.loads(REFERENCE_CONFIG.read_text()))
    assert 0.96 < shares(table)["routed experts"] < 0.97


@pytest.mark.parametrize(("gib", "tolerance"), [(1, 0.10), (2, 0.04), (4, 0.015), (16, 0.005)])
def test_bench_config_follows_v4_pros_mix(gib, tolerance):
    reference = release_mix(_RELEASE_CONFIG)
    config = bench_config(copy.deepcopy(_RELEASE_CONFIG), gib)
    built = byte_mix(release_specs(config))
    assert set(built) == set(ROLES)
    assert mix_distance(built, reference) <= tolerance
    assert 0.9 * gib * 2**30 < sum(built.values()) < 1.2 * gib * 2**30
    assert config["num_hidden_layers"] == len(config["compress_ratios"]) == 1
