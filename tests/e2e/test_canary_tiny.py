"""The node's canaries (harness/preflight) run as the b200 preflight runs them, each step a `dsv4`
subprocess, on the micro release on CPU: slice -> calibrate -> convert --amax (the one-GPU path, the
preflight's default) and slice -> dequant -> quantize -> convert (the BF16 path), then `dsv4 serve
--print`, which runs serve's own checks on the converted slice without starting vLLM. The commands,
their flags and the hand-over between steps work before the node runs them on the real release."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness import preflight as P
from harness.replica import clone_replica
from pipeline import mapping as M
from pipeline.checkpoint import Checkpoint, Layout, validate_checkpoint
from pipeline.convert import REPORT_NAME
from pipeline.release_layout import release_tensors

pytestmark = [pytest.mark.tiny, pytest.mark.quant]


def run_canary(micro_release: Path, work: Path, make_steps, upto: int):
    """(steps, results of the first ``upto`` steps, stopping at a failure) of the canary ``make_steps``
    builds, on a copy of the micro release with a tokenizer file, on CPU."""
    release = clone_replica(micro_release, work / "release")
    (release / "tokenizer.json").write_text("{}")  # serve wants one; the micro model has no tokenizer
    # tensor parallel 4: the micro model has 4 attention heads (the node's is 8 of 128)
    steps = make_steps(release, work, layers=2, experts=2, device="cpu", tensor_parallel=4)
    results = []
    for step in steps[:upto]:
        results.append(P.run_step(step, work / "logs"))
        if not results[-1].ok:
            break
    return steps, results


@pytest.fixture(scope="module")
def canary(micro_release: Path, tmp_path_factory: pytest.TempPathFactory):
    """(workdir, steps, results of steps 1-4) of the BF16 path's canary."""
    work = tmp_path_factory.mktemp("canary")
    return (work, *run_canary(micro_release, work, P.canary_steps, 4))


def test_canary_slice_dequant_quantize_convert(canary):
    work, _, results = canary
    for r in results:
        assert r.ok, f"{r.name}: exit {r.returncode}\n{r.tail}"
    assert [r.name for r in results] == ["slice", "dequant", "quantize", "convert"]
    sliced = Checkpoint.open(work / "slice")
    assert set(sliced.tensors) == {t.key for t in release_tensors(sliced.config)}
    assert (work / "slice" / "tokenizer.json").is_file()
    report = validate_checkpoint(work / "converted", full_scales=True, expect=Layout.NVFP4)
    assert report.ok, report.problems
    converted = Checkpoint.open(work / "converted")
    assert converted.config["n_routed_experts"] == 2 and converted.config["num_hidden_layers"] == 2
    assert any(k.startswith("mtp.0.ffn.experts.1.") for k in converted.tensors)  # grafted from the slice


def test_canary_serve_checks_accept_the_converted_slice(canary):
    work, steps, results = canary
    assert all(r.ok for r in results)
    printed = P.run_step(P.CanaryStep("serve-print", [*steps[4].argv, "--print"], 120), work / "logs")
    assert printed.ok, printed.tail
    assert "--tensor-parallel-size 4" in printed.tail


@pytest.fixture(scope="module")
def one_gpu_canary(micro_release: Path, tmp_path_factory: pytest.TempPathFactory):
    """The one-GPU canary (harness/preflight.one_gpu_canary_steps, what `pytest -m b200` runs by default):
    (workdir, steps, results of slice -> calibrate -> convert --amax)."""
    work = tmp_path_factory.mktemp("canary-one-gpu")
    return (work, *run_canary(micro_release, work, P.one_gpu_canary_steps, 3))


def test_one_gpu_canary_slice_calibrate_convert(one_gpu_canary):
    work, _, results = one_gpu_canary
    for r in results:
        assert r.ok, f"{r.name}: exit {r.returncode}\n{r.tail}"
    assert [r.name for r in results] == ["slice", "calibrate", "convert"]
    report = validate_checkpoint(work / "converted", full_scales=True, expect=Layout.NVFP4)
    assert report.ok, report.problems
    converted = Checkpoint.open(work / "converted")
    assert converted.config["n_routed_experts"] == 2 and converted.config["num_hidden_layers"] == 2
    # the experts requantized with the calibrated amax (the report's action per output), the MTP block's
    # transcoded from the slice
    report = json.loads((work / "converted" / REPORT_NAME).read_text())
    actions = {r["action"] for r in report["outputs_by_source_rule_action"]}
    assert {M.REQUANTIZE_EXPERT, M.TRANSCODE} <= actions, actions
    assert any(k.startswith("layers.1.ffn.experts.1.w1.") for k in converted.tensors)
    assert any(k.startswith("mtp.0.ffn.experts.1.") for k in converted.tensors)


def test_one_gpu_canary_serve_checks_accept_the_converted_slice(one_gpu_canary):
    work, steps, results = one_gpu_canary
    assert all(r.ok for r in results)
    printed = P.run_step(P.CanaryStep("serve-print", [*steps[3].argv, "--print"], 120), work / "logs")
    assert printed.ok, printed.tail
    assert "--tensor-parallel-size 4" in printed.tail
