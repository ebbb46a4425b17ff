"""The full-scale sparse replica of the release: 64 shards, 145,116 real headers, holes for data.

Validation, inspection and planning run on the real layout in seconds and read only headers and a
sample of scale tensors, never the 805 GiB of data.
"""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest

from harness.checkpoints import tree_digest
from harness.replica import RELEASE_SHARDS, RELEASE_TENSORS, load_weights_table
from pipeline.checkpoint import INDEX_NAME, Checkpoint, Layout, read_header, summarize, validate_checkpoint
from pipeline.checkpoint import validate as validate_mod
from pipeline.checkpoint.validate import SCALE_SUFFIXES

pytestmark = pytest.mark.slow  # full scale: the 145,116-key replica

RELEASE_DATA_BYTES = 864_704_792_696  # 805.3 GiB
RELEASE_ELEMENTS = 861_608_274_846  # the published parameter count


def test_replica_is_header_true_and_sparse(release_replica):
    ck = Checkpoint.open(release_replica)
    assert len(ck.shards) == RELEASE_SHARDS and len(ck.tensors) == RELEASE_TENSORS
    assert ck.total_bytes == RELEASE_DATA_BYTES
    assert sum(t.numel for t in ck.tensors.values()) == RELEASE_ELEMENTS
    rows = load_weights_table()
    assert {k: (d, s, sh) for k, d, s, sh in rows} == {
        k: (t.dtype, t.shape, t.file.name) for k, t in ck.tensors.items()
    }
    assert Counter(t.dtype for t in ck.tensors.values()) == Counter(
        {"F8_E8M0": 71952, "I8": 71424, "BF16": 619, "F32": 590, "F8_E4M3": 528, "I64": 3}
    )
    used = sum(p.stat().st_blocks * 512 for p in release_replica.iterdir())
    assert used < 64 * 2**20, f"the replica uses {used / 2**20:.1f} MiB of disk"
    assert (
        json.loads((release_replica / INDEX_NAME).read_text())["metadata"]["total_size"] == RELEASE_DATA_BYTES
    )


def test_replica_validates_fast_reading_only_a_sample_of_scales(release_replica, monkeypatch):
    read = {"bytes": 0, "tensors": 0}
    real = validate_mod.read_tensor

    def counting(info, f=None):
        read["bytes"] += info.nbytes
        read["tensors"] += 1
        return real(info, f)

    monkeypatch.setattr(validate_mod, "read_tensor", counting)
    before = tree_digest(release_replica)
    report = validate_checkpoint(release_replica)
    assert report.ok, [str(p) for p in report.problems[:10]]
    assert report.layout == Layout.RELEASE.value
    assert (report.shards, report.tensors, report.tensor_bytes) == (64, RELEASE_TENSORS, RELEASE_DATA_BYTES)
    assert read["tensors"] == report.scales_checked == validate_mod.DEFAULT_SAMPLE
    assert read["bytes"] < 128 * 2**20
    assert tree_digest(release_replica) == before


def test_replica_inspect_summary(release_replica):
    before = tree_digest(release_replica)
    s = summarize(release_replica)
    assert tree_digest(release_replica) == before
    assert s["shards"] == 64 and s["tensors"] == RELEASE_TENSORS and s["bytes"] == RELEASE_DATA_BYTES
    roles = s["by_role"]
    assert roles["routed experts"]["tensors"] == 61 * 384 * 6
    assert roles["embed/head"]["tensors"] == 2
    assert roles["indexer"]["tensors"] == 30 * 7  # ratio-4 layers
    assert sum(r["bytes"] for r in roles.values()) == RELEASE_DATA_BYTES
    assert "other" not in roles
    cfg = s["config"]
    assert cfg["num_hidden_layers"] == 61 and cfg["n_routed_experts"] == 384 and cfg["num_hash_layers"] == 3
    assert cfg["compress_ratios"] == {"entries": 62, "counts": {0: 1, 4: 30, 128: 31}}
    assert cfg["quantization_config"]["quant_method"] == "fp8"


def test_replica_refused_where_bf16_is_needed(release_replica):
    before = tree_digest(release_replica)
    report = validate_checkpoint(release_replica, expect=Layout.BF16, step="quantize")
    assert tree_digest(release_replica) == before
    [p] = report.problems
    assert "quantize needs a BF16" in p.message and "release FP8+MXFP4" in p.message


def test_replica_copy_with_a_nan_scale_leaves_the_replica_alone(release_replica, replica_copy):
    before = tree_digest(release_replica)
    copy = replica_copy()
    weight_map = json.loads((copy / INDEX_NAME).read_text())["weight_map"]
    key = min(k for k in weight_map if k.endswith(SCALE_SUFFIXES))  # the sample always has the first one
    shard = copy / weight_map[key]
    info = read_header(shard).tensors[key]
    with shard.open("r+b") as f:
        f.seek(info.begin + 7)
        f.write(b"\xff")
    report = validate_checkpoint(copy)
    [p] = report.problems
    assert (p.file, p.key) == (str(shard), key) and "NaN (byte 0xFF) at flat index 7" in p.message
    assert tree_digest(release_replica) == before


def test_replica_copy_with_a_truncated_shard(replica_copy):
    copy = replica_copy()
    shard = copy / "model-00030-of-00064.safetensors"
    last = max(read_header(shard).tensors.values(), key=lambda t: t.end).key
    os.truncate(shard, shard.stat().st_size - 1)
    problems = validate_checkpoint(copy).problems
    assert [(p.file, p.key) for p in problems] == [(str(shard), "layers.28.attn.attn_sink")]
    assert "truncated" in problems[0].message and f"key {last} ends past the end" in problems[0].message


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("num_hidden_layers", 60, "unexpected layers.60"),
        ("n_routed_experts", 256, "is 256 but layers.0 has 384 expert(s), unexpected {256-383}"),
        ("num_hash_layers", 2, "layer 2 is not a hash layer"),
    ],
)
def test_replica_copy_with_a_config_mismatch(replica_copy, field, value, fragment):
    copy = replica_copy()
    cfg = copy / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), field: value}))
    problems = [p for p in validate_checkpoint(copy).problems if p.key == field]
    assert problems and fragment in problems[0].message and problems[0].file == str(cfg)
