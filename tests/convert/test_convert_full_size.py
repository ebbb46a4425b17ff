"""`dsv4 convert` planned at V4 Pro scale, from headers alone: a sparse replica of a full-size ModelOpt
export (harness/exports.py's key set for the real config, data left as holes) in dialects H and X,
with and without --graft-from the sparse replica of the release. Checks the plan writes exactly the
converted layout (288k+ keys), per-action counts from the real shapes, and that planning stays a
seconds-long header read (nothing is converted: the data are holes)."""

from __future__ import annotations

import json
import struct
from collections import Counter
from pathlib import Path

import pytest

from harness.exports import export_tensors
from harness.replica import REFERENCE_CONFIG, write_sparse
from pipeline import mapping as M
from pipeline.checkpoint import Checkpoint
from pipeline.checkpoint.writer import PlannedTensor, plan_shards
from pipeline.convert import dry_run_table, plan_convert

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def config() -> dict:
    if not REFERENCE_CONFIG.exists():
        pytest.skip(
            f"{REFERENCE_CONFIG} not found (the V4 Pro reference lives in ../shared next to the repo)"
        )
    return json.loads(REFERENCE_CONFIG.read_text())


def _fill_global_scales(root: Path) -> None:
    """Holes read as 0, which the validator rightly refuses for NVFP4 global and input scales: write 1.0
    into every 0-d F32 tensor (4 bytes each; the rest stays sparse)."""
    one = struct.pack("<f", 1.0)
    by_file: dict[Path, list] = {}
    for info in Checkpoint.open(root).tensors.values():
        if info.dtype == "F32" and tuple(info.shape) == ():
            by_file.setdefault(info.file, []).append(info)
    for path, infos in by_file.items():
        with open(path, "r+b") as f:
            for info in infos:
                f.seek(info.begin)
                f.write(one)


@pytest.fixture(scope="module")
def sparse_export(config, tmp_path_factory):
    root = tmp_path_factory.mktemp("full-size-exports")
    built: dict[tuple[str, str], Path] = {}

    def get(recipe: str, dialect: str) -> Path:
        if (recipe, dialect) not in built:
            tensors = [PlannedTensor(k, d, s) for k, d, s in export_tensors(config, recipe, dialect)]
            cfg = dict(config, quantization_config={"quant_method": "modelopt", "quant_algo": "NVFP4"})
            out = write_sparse(plan_shards(tensors), root / f"{recipe}-{dialect}", cfg)
            _fill_global_scales(out)
            built[(recipe, dialect)] = out
        return built[(recipe, dialect)]

    return get


@pytest.mark.parametrize(("recipe", "dialect"), [("experts", "X"), ("full", "H")])
def test_full_size_export_plans_onto_the_converted_layout(config, sparse_export, recipe, dialect):
    plan = plan_convert(sparse_export(recipe, dialect), scale_sample=0)
    layout = M.target_layout(config)
    no_mtp = {k for k in layout if not k.startswith("mtp.")}
    assert set(plan.layout) == no_mtp and len(no_mtp) > 280_000
    assert plan.config["num_nextn_predict_layers"] == 0
    experts = config["num_hidden_layers"] * config["n_routed_experts"]
    actions = Counter()
    for (_, _, action), n in plan.counts().items():
        actions[action] += n
    assert actions[M.KEEP_NVFP4] == experts * (4 * 3 - 4)  # w2's four tensors, w1/w3 weight + input_scale
    assert actions[M.UNIFY_W13] == experts * 4
    if recipe == "full":
        assert actions[M.NVFP4_TO_FP8] > 0 and actions[M.NVFP4_TO_BF16] > 0


def test_full_size_graft_from_the_release_replica(config, sparse_export, release_replica, tmp_path):
    plan = plan_convert(sparse_export("experts", "X"), graft_from=release_replica, scale_sample=0)
    layout = M.target_layout(config)
    assert set(plan.layout) == set(layout)
    actions = Counter(plan.jobs[plan.job_of[k]].action for k in plan.layout)
    mtp_experts = config["num_nextn_predict_layers"] * config["n_routed_experts"]
    assert actions[M.TRANSCODE] == mtp_experts * 3 * 3  # weight, weight_scale, weight_scale_2
    assert actions[M.FALLBACK_INPUT_SCALE] == mtp_experts * 3
    assert actions[M.GRAFT] == sum(1 for t in layout.values() if t.fmt != M.NVFP4)
    table = dry_run_table(plan, tmp_path / "out")
    assert "graft" in table and "mxfp4->nvfp4-transcode" in table
    print(table)


def test_full_size_transcode_plans_every_expert_tensor(config, sparse_export, release_replica):
    """--experts transcode at V4 Pro scale: every routed expert of every layer and of the MTP block is
    transcoded from the release replica (w1/w3 as pairs), activation scales from the export."""
    plan = plan_convert(
        sparse_export("experts", "X"), graft_from=release_replica, experts="transcode", scale_sample=0
    )
    blocks = config["num_hidden_layers"] + config["num_nextn_predict_layers"]
    experts = blocks * config["n_routed_experts"]
    actions = Counter(plan.jobs[plan.job_of[k]].action for k in plan.layout)
    assert actions[M.TRANSCODE] == experts * 3 * 3
    jobs = Counter(j.action for j in plan.jobs.values())
    assert jobs[M.TRANSCODE] == experts * 2  # one job for w1+w3 (shared m), one for w2
    assert actions[M.KEEP_NVFP4] == config["num_hidden_layers"] * config["n_routed_experts"] * 3
