"""The node's preflight checks (harness/preflight.py) on CPU: fake GPUs, fake constraints and meminfo, a
stand-in hf_ptq.py and vLLM interpreter. The b200 tests (tests/preflight/test_node_preflight.py) are thin wrappers over these
functions; a few are called here directly with fake fixtures. The full-scale plan (the real V4 Pro's disk
and RAM, from the sparse replica) is tests/preflight/test_preflight_full.py, in the slow tier."""

from __future__ import annotations

import argparse
import importlib.util
import json
import stat
import sys
from pathlib import Path

import pytest

from harness import preflight as P
from pipeline.errors import DsV4Error
from tests.preflight import conftest as b200_conftest
from tests.preflight import test_node_preflight as node_tests

pytestmark = pytest.mark.unit

GIB = 1024**3
B200 = dict(name="NVIDIA B200", capability=(10, 0), total_bytes=179 * GIB, free_bytes=178 * GIB)


def fake_gpus(n: int = 8, **override) -> list[P.GpuInfo]:
    return [P.GpuInfo(i, **{**B200, **override}) for i in range(n)]


# ---- GPUs, RAM, disk ---------------------------------------------------------------------------------


def test_eight_free_blackwell_gpus_pass():
    assert P.check_gpus(fake_gpus()) == []


def test_gpu_count_capability_and_free_memory_are_each_named(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6")
    (msg,) = P.check_gpus(fake_gpus(7))
    assert "7 GPU(s) visible (CUDA_VISIBLE_DEVICES='0,1,2,3,4,5,6')" in msg and "--gpus N" in msg
    hopper = P.check_gpus(fake_gpus(8, name="NVIDIA H100", capability=(9, 0)))
    assert len(hopper) == 8 and "compute capability 9.0; the run needs 10.x" in hopper[0]
    busy = fake_gpus()
    busy[3] = P.GpuInfo(3, **{**B200, "free_bytes": 40 * GIB})
    (msg,) = P.check_gpus(busy)
    assert msg.startswith("GPU 3 has 40.0 of 179.0 GiB free") and "nvidia-smi" in msg


def test_ram_from_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       2900000000 kB\nMemAvailable:   2700000000 kB\n")
    available = P.mem_available(meminfo)
    assert available == 2_700_000_000 * 1024
    need = P.ram_needed(3_200_000_000_000, 8 * 179 * GIB)
    assert P.check_ram(available, need) == []
    (msg,) = P.check_ram(1_000_000_000_000, need)
    assert "1.00 TB of RAM available" in msg and "Run 3" in msg


def test_disk_counts_what_is_still_to_write(tmp_path):
    plan = [("a", 1000), ("b", 500)]
    assert P.check_disk(plan, 1600) == []
    (msg,) = P.check_disk(plan, 1200, where="/data")
    assert msg.startswith("/data: 0.000 TB free") and "a 0.000 TB; b 0.000 TB" in msg
    assert P.check_disk(plan, 1200, done=["b"]) == []
    assert P.check_disk([("a", 1000)], 1010) != []  # the margin: reports, journals, calibration state
    probe, free = P.free_bytes(tmp_path / "not" / "yet")
    assert probe == tmp_path and free > 0


# ---- versions, code ------------------------------------------------------------------------------------


def test_pins_and_mismatches_against_a_fake_constraints_file(tmp_path):
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("# comment\ntorch==2.13.0\nNvidia_ModelOpt == 0.47.0  # why\nnumpy>=2\n")
    assert P.read_pins(constraints) == {"torch": "2.13.0", "nvidia-modelopt": "0.47.0"}
    ok = {"torch": "2.13.0+cu130", "nvidia-modelopt": "0.47.0"}  # a local label is the same release
    assert P.version_mismatches(ok, constraints) == []
    problems = P.version_mismatches(
        {"torch": "2.11.0", "nvidia-modelopt": None, "transformers": "5.23.0"}, constraints
    )
    assert problems[0].startswith("torch 2.11.0 is installed, constraints.txt pins 2.13.0")
    assert "nvidia-modelopt: not installed" in problems[1]
    assert problems[2].startswith("transformers: no ==pin in constraints.txt")


def test_the_repository_pins_every_package_of_the_quant_env():
    pins = P.read_pins(P.CONSTRAINTS, P.PYPROJECT)
    assert {"torch", "transformers", "nvidia-modelopt"} <= pins.keys()
    assert pins["nvidia-modelopt"] == "0.47.0" and pins["transformers"] == "5.23.0"
    installed = P.installed_versions(["torch", "no-such-package-dsv4"])
    assert installed["torch"] and installed["no-such-package-dsv4"] is None


def fake_python(tmp_path: Path, output: str) -> Path:
    """An 'interpreter' that prints ``output`` whatever it is asked (the serving env's stand-in)."""
    exe = tmp_path / "bin" / "python"
    exe.parent.mkdir(parents=True, exist_ok=True)
    exe.write_text(f"#!/bin/sh\necho '{output}'\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return exe


def test_vllm_version_is_asked_of_the_serving_interpreter(tmp_path):
    assert P.vllm_version(fake_python(tmp_path, "0.33.1")) == "0.33.1"
    assert P.vllm_version(sys.executable) is None  # this venv has no vLLM
    assert P.check_vllm_version("0.33.1", "0.33") == []
    assert P.check_vllm_version("0.33.0+cu130", "0.33") == []
    (msg,) = P.check_vllm_version("0.32.0", "0.33", "/venv/bin/python")
    assert "vLLM 0.32.0 is installed for /venv/bin/python" in msg and "--target-vllm" in msg
    assert "not installed" in P.check_vllm_version(None)[0]
    assert P.vllm_bin_for(tmp_path / "bin" / "python") == "vllm"
    (tmp_path / "bin" / "vllm").write_text("")
    assert P.vllm_bin_for(tmp_path / "bin" / "python") == str(tmp_path / "bin" / "vllm")


def test_code_digest_mismatch_names_run_5():
    assert P.check_code("abc", "abc") == []
    (msg,) = P.check_code("abc", "def")
    assert "digest def, the laptop tested abc" in msg and "Run 5" in msg


# ---- hf_ptq dry run ---------------------------------------------------------------------------------------


def test_hf_ptq_dry_run_on_a_stand_in_checkout(tmp_path):
    from pipeline import hf_ptq
    from tests.quantize.test_hf_ptq_driver import make_repo

    repo = make_repo(tmp_path / "modelopt", hf_ptq.load_contract())
    result = P.hf_ptq_dry_run(repo, "/data/v4-bf16", "/data/v4-export", compare_contract=False)
    assert result["problems"] == []
    assert result["argv"][:4] == ["--pyt_ckpt_path", "/data/v4-bf16", "--export_path", "/data/v4-export"]
    args = result["args"]
    assert args["qformat"] == "nvfp4_experts_only" and args["calib_size"] == [128]
    assert args["inference_tensor_parallel"] == 8


def test_hf_ptq_dry_run_fails_on_a_checkout_without_hf_ptq(tmp_path):
    with pytest.raises(DsV4Error, match=r"no hf_ptq\.py in ModelOpt checkout"):
        P.hf_ptq_dry_run(tmp_path, "/a", "/b", compare_contract=False)


# ---- the canary ---------------------------------------------------------------------------------------------


def _parse(argv: list[str]) -> argparse.Namespace:
    """Parse a canary step's `dsv4` argv with the real parsers (the subcommand's own flag names)."""
    from pipeline.cli import build_parser

    assert argv[:3] == [sys.executable, "-m", "pipeline"]
    return build_parser().parse_args(argv[3:])


def test_every_canary_command_parses_with_the_real_cli(tmp_path):
    steps = P.canary_steps("/data/release", tmp_path, vllm_bin="/srv/bin/vllm", tensor_parallel=8)
    assert [s.name for s in steps] == ["slice", "dequant", "quantize", "convert", "serve"]
    if importlib.util.find_spec("pipeline.cli.serve") is None:  # dsv4 serve is being written
        steps = steps[:-1]
    parsed = {s.name: _parse(s.argv) for s in steps}
    assert parsed["slice"].layers == 2 and parsed["slice"].experts == 8
    assert parsed["dequant"].src == str(tmp_path / "slice") and parsed["dequant"].device == "cuda"
    assert parsed["quantize"].recipe == "experts" and parsed["quantize"].device == "cuda"
    assert parsed["convert"].graft_from == str(tmp_path / "slice")
    if "serve" in parsed:
        assert parsed["serve"].tensor_parallel_size == 8 and parsed["serve"].vllm_bin == "/srv/bin/vllm"
        assert parsed["serve"].tokenizer == "/data/release" and parsed["serve"].max_model_len == 4096
    assert sum(s.timeout for s in steps[:4]) <= 1000


# ---- GSM8K -----------------------------------------------------------------------------------------------------


def test_gsm8k_command_and_score(tmp_path):
    argv = P.gsm8k_argv("/srv/bin/python", "/data/conv", tmp_path, limit=200, tokenizer="/data/release")
    assert argv[:5] == ["/srv/bin/python", "-m", "lm_eval", "--model", "vllm"]
    model_args = argv[argv.index("--model_args") + 1]
    assert "pretrained=/data/conv" in model_args and "tensor_parallel_size=8" in model_args
    assert "tokenizer=/data/release" in model_args and argv[-2:] == ["--limit", "200"]
    results = tmp_path / "data__conv" / "results_2026-11-22T00-00-00.json"
    results.parent.mkdir()
    results.write_text(
        json.dumps({"results": {"gsm8k": {"exact_match,strict-match": 0.93, "alias": "gsm8k"}}})
    )
    assert P.gsm8k_score(tmp_path) == (0.93, "exact_match,strict-match", results)
    with pytest.raises(FileNotFoundError):
        P.gsm8k_score(tmp_path / "empty")
    assert P.module_missing(sys.executable, "json") is None
    assert "cannot import no_such_module_dsv4" in P.module_missing(sys.executable, "no_such_module_dsv4")


# ---- the b200 tests' wrappers, called with fake fixtures -------------------------------------------------------


def fake_node(tmp_path: Path, **kw) -> b200_conftest.NodeOptions:
    base = dict(
        source=None,
        export=None,
        converted=None,
        modelopt_repo=None,
        expect_code=None,
        outputs=tmp_path,
        canary_dir=tmp_path / "canary",
        keep_canary=False,
        vllm_python=sys.executable,
        target_vllm="0.33",
        gpus=8,
        gsm8k=False,
        gsm8k_threshold=0.9,
        gsm8k_limit=0,
    )
    return b200_conftest.NodeOptions(**{**base, **kw})


def test_b200_wrappers_pass_and_fail_with_the_check_messages(tmp_path):
    node = fake_node(tmp_path)
    node_tests.test_gpus(fake_gpus(), node)
    with pytest.raises(pytest.fail.Exception, match=r"compute capability 9\.0"):
        node_tests.test_gpus(fake_gpus(8, capability=(9, 0)), node)
    node_tests.test_disk_for_every_output(node, [("small", 1000)])
    with pytest.raises(pytest.fail.Exception, match="the run writes"):
        node_tests.test_disk_for_every_output(node, [("huge", 10**18)])
    with pytest.raises(pytest.skip.Exception, match="pass --expect-code"):
        node_tests.test_code_is_what_the_laptop_tested(node)
    with pytest.raises(pytest.fail.Exception, match="Run 5"):
        node_tests.test_code_is_what_the_laptop_tested(fake_node(tmp_path, expect_code="0" * 16))
    with pytest.raises(pytest.skip.Exception, match="--modelopt-repo"):
        node_tests.test_hf_ptq_dry_run(node)
    with pytest.raises(pytest.skip.Exception, match="pass --gsm8k"):
        node_tests.test_gsm8k(node)


def test_b200_header_validation_wrappers(tiny_release, tiny_bf16, exports, tmp_path):
    node_tests.test_source_headers(tiny_release)
    with pytest.raises(pytest.fail.Exception, match="needs a release FP8\\+MXFP4"):
        node_tests.test_source_headers(tiny_bf16)
    node_tests.test_export_headers(fake_node(tmp_path, export=exports("experts", "X")))
    with pytest.raises(pytest.fail.Exception, match="NVFP4 export"):
        node_tests.test_export_headers(fake_node(tmp_path, export=tiny_release))
