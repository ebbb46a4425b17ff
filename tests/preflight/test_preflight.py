"""The node's preflight checks (harness/preflight.py) on CPU: fake GPUs, fake constraints and meminfo, a
stand-in hf_ptq.py and vLLM interpreter, the micro release for the one-GPU path's memory. The b200 tests
(tests/preflight/test_node_preflight.py) are thin wrappers over these functions; a few are called here
directly with fake fixtures. The full-scale plan (the real V4 Pro's disk, RAM and GPU need of both paths,
from the sparse replica) is tests/preflight/test_preflight_full.py, in the slow tier."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import stat
import sys
import warnings
from pathlib import Path

import pytest

from harness import preflight as P
from pipeline.checkpoint import Checkpoint
from pipeline.checkpoint.dtypes import itemsize
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


# ---- the one-GPU path: memory derived from the tensor table --------------------------------------------


def _stored_bytes(ckpt: Checkpoint, block: str) -> int:
    return sum(
        math.prod(t.shape) * itemsize(t.dtype) for k, t in ckpt.tensors.items() if k.startswith(block + ".")
    )


def test_block_bytes_are_the_checkpoints_own(tiny_release, tiny_bf16):
    """Per block, the table's release bytes are the release's tensors, and its BF16 bytes are what
    `dsv4 dequant` wrote for it: the one-GPU path's memory rests on these two numbers."""
    release, bf16 = Checkpoint.open(tiny_release), Checkpoint.open(tiny_bf16)
    blocks = P.block_bytes(release.config)
    names = [b.block for b in blocks]
    assert names == [f"layers.{i}" for i in range(release.config["num_hidden_layers"])] + ["mtp.0"]
    for b in blocks:
        assert b.release == _stored_bytes(release, b.block) > 0, b.block
        assert b.bf16 == _stored_bytes(bf16, b.block) > b.release, b.block
        largest = max(math.prod(t.shape) for k, t in bf16.tensors.items() if k.startswith(b.block + "."))
        assert b.largest_weight == largest, b.block


def test_one_gpu_memory_is_the_largest_block_the_embedding_and_the_activations(tiny_release):
    config = Checkpoint.open(tiny_release).config
    blocks = P.block_bytes(config)
    act = P.activation_bytes(config, 8, 32)
    assert act == 8 * 32 * config["hc_mult"] * config["hidden_size"] * 2  # [samples, seq, hc, hidden] BF16
    parts = dict(P.one_gpu_calibration_memory(config, 8, 32))
    print("\n" + P.format_memory(list(parts.items())))
    biggest = max(blocks, key=lambda b: b.bf16)
    assert parts[f"largest block in BF16 ({biggest.block})"] == biggest.bf16
    assert (
        parts["embedding in BF16, on the device for the run"]
        == config["vocab_size"] * config["hidden_size"] * 2
    )
    assert parts["activations: a layer's inputs and outputs, 2 x 8 x 32 tokens"] == 2 * act
    need = P.one_gpu_calibration_bytes(config, 8, 32)
    assert need == sum(parts.values())
    # more tokens, more memory: exactly the two extra sets of activations
    assert P.one_gpu_calibration_bytes(config, 16, 32) - need == 2 * act
    ram = dict(P.one_gpu_ram_memory(config, 8, 32))
    biggest_read = max(b.release for b in blocks)
    assert (
        sum(ram.values())
        == P.one_gpu_ram_bytes(config, 8, 32)
        == 2 * biggest_read + 2 * act + P.CALIB_RAM_HEADROOM
    )
    # --device cpu: the layer, the embedding and the activations live in RAM too
    assert P.one_gpu_ram_bytes(config, 8, 32, device="cpu") == P.one_gpu_ram_bytes(config, 8, 32) + need


def test_the_run_calibrates_as_the_seeds_did():
    from pipeline.hf_ptq.options import HfPtqConfig

    seeds = HfPtqConfig("", "")
    assert (P.CALIB_SAMPLES, P.CALIB_SEQ_LEN) == (seeds.calib_size[0], seeds.calib_seq) == (128, 512)


def test_calibration_gpu_on_fake_devices(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    need = 62 * GIB
    assert P.check_calibration_gpu(fake_gpus(), need) == []
    # one GPU is enough, of any compute capability (an H200 calibrates; no NVFP4 kernel runs)
    h200 = [P.GpuInfo(0, "NVIDIA H200", (9, 0), 139 * GIB, 138 * GIB)]
    assert P.check_calibration_gpu(h200, need) == [] and P.calibration_gpus(h200, need) == [0]
    busy = fake_gpus(8, free_bytes=40 * GIB)
    busy[5] = P.GpuInfo(5, **{**B200, "free_bytes": 100 * GIB})
    assert P.calibration_gpus(busy, need) == [5] and P.check_calibration_gpu(busy, need) == []
    (msg,) = P.check_calibration_gpu(fake_gpus(8, free_bytes=40 * GIB), need)
    assert msg.startswith("no GPU has 62.0 GiB free for dsv4 calibrate")
    assert "GPU 0 (NVIDIA B200) with 40.0 of 179.0 GiB free" in msg and "--samples / --seq-len" in msg
    assert P.check_calibration_gpu(h200, 139 * GIB) != []  # free, not total, is what counts
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    (msg,) = P.check_calibration_gpu([], need)
    assert msg.startswith("no CUDA GPU visible (CUDA_VISIBLE_DEVICES='')") and "--device cpu" in msg


def test_one_gpu_ram_message():
    assert P.check_ram(60 * GIB, 49 * GIB, P.PATH_ONE_GPU) == []
    (msg,) = P.check_ram(30 * GIB, 49 * GIB, P.PATH_ONE_GPU)
    assert msg.startswith("30.0 GiB of RAM available, dsv4 calibrate needs 49.0 GiB") and "--seq-len" in msg
    (msg,) = P.check_ram(30 * GIB, 49 * GIB)  # the BF16 path's message stays the default
    assert "the quantize step needs" in msg


def test_one_gpu_disk_plan_of_the_micro_release(tiny_release):
    """The one-GPU plan's parts, each from its own function, and what counts as already written."""
    config = Checkpoint.open(tiny_release).config
    plan = dict(P.one_gpu_disk_plan(tiny_release, samples=8, seq_len=32, canary_experts=2))
    print("\n" + P.format_disk_plan(list(plan.items())))
    assert list(plan) == [P.STEP_CALIBRATE, P.STEP_CONVERTED_AMAX, P.STEP_CANARY_ONE_GPU]
    act = P.activation_bytes(config, 8, 32)
    assert (
        plan[P.STEP_CALIBRATE] == P.calibrate_disk_bytes(config, 8, 32) == 2 * act + 2 * P.amax_bytes(config)
    )
    assert (
        plan[P.STEP_CONVERTED_AMAX]
        == P.converted_bytes(config)
        == dict(P.disk_plan(tiny_release, canary_experts=2))[P.STEP_CONVERTED]
    )
    assert P.steps_done() == []
    assert P.steps_done(amax=True) == [P.STEP_CALIBRATE]
    assert set(P.steps_done(export=True, converted=True)) == {
        P.STEP_EXPORT,
        P.STEP_CONVERTED,
        P.STEP_CONVERTED_AMAX,
    }
    free = sum(plan.values())
    assert P.check_disk(list(plan.items()), free) != []  # the margin
    assert P.check_disk(list(plan.items()), free, done=P.steps_done(amax=True, converted=True)) == []


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
    """The BF16 path's canary (--path bf16)."""
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


def _one_gpu_canary(tmp_path: Path) -> dict[str, P.CanaryStep]:
    steps = P.one_gpu_canary_steps("/data/release", tmp_path, vllm_bin="/srv/bin/vllm", tensor_parallel=8)
    assert [s.name for s in steps] == [
        "slice",
        "calibrate",
        "convert",
        "serve",
    ]  # the path the node leads with
    return {s.name: s for s in steps}


def test_one_gpu_canary_hands_each_output_to_the_next_step(tmp_path):
    """slice -> calibrate -> convert --amax -> serve: each step reads what the one before wrote. The slice
    and serve steps parse with today's CLI; calibrate and convert --amax are the next test's."""
    steps = _one_gpu_canary(tmp_path)
    sl, amax, conv = str(tmp_path / "slice"), str(tmp_path / "amax.safetensors"), str(tmp_path / "converted")
    calibrate, convert = steps["calibrate"].argv, steps["convert"].argv
    assert calibrate[3:6] == ["calibrate", sl, amax]
    assert convert[3:6] == ["convert", sl, conv] and convert[convert.index("--amax") + 1] == amax
    assert "--graft-from" not in convert  # no export: the release (here its slice) is the input
    assert calibrate[calibrate.index("--samples") + 1] == str(P.CANARY_SAMPLES)
    assert calibrate[calibrate.index("--seq-len") + 1] == str(P.CANARY_SEQ_LEN)
    assert "--restart" in calibrate  # a work folder of an earlier slice would be refused
    parsed_slice = _parse(steps["slice"].argv)
    assert (parsed_slice.src, parsed_slice.dst, parsed_slice.layers, parsed_slice.experts) == (
        "/data/release",
        sl,
        2,
        8,
    )
    if importlib.util.find_spec("pipeline.cli.serve") is not None:
        serve = _parse(steps["serve"].argv)
        assert serve.ckpt == conv and serve.tensor_parallel_size == 8 and serve.tokenizer == "/data/release"
    assert sum(s.timeout for n, s in steps.items() if n != "serve") <= 1000


def _calibrate_missing() -> str | None:
    """Why the one-GPU canary's new commands cannot be parsed here, or None once they have landed."""
    from pipeline.cli import SUBCOMMANDS

    if "pipeline.cli.calibrate" in SUBCOMMANDS:
        return None
    return (
        "dsv4 calibrate is not in pipeline.cli.SUBCOMMANDS yet (issue 16's calibrate branch; convert --amax "
        "comes with the amax branch): this test parses the one-GPU canary's calibrate and convert --amax "
        "steps once they have landed"
    )


def test_one_gpu_canary_calibrate_and_convert_amax_parse_with_the_real_cli(tmp_path):
    missing = _calibrate_missing()
    if missing:
        pytest.skip(missing)
    steps = _one_gpu_canary(tmp_path)
    sl, amax = str(tmp_path / "slice"), str(tmp_path / "amax.safetensors")
    calibrate = _parse(steps["calibrate"].argv)
    assert (str(calibrate.release), str(calibrate.amax)) == (sl, amax)
    assert (calibrate.samples, calibrate.seq_len) == (P.CANARY_SAMPLES, P.CANARY_SEQ_LEN)
    assert calibrate.recipe == "experts" and calibrate.device == "cuda" and calibrate.restart
    convert = _parse(steps["convert"].argv)
    assert str(convert.amax) == amax and convert.recipe == "experts" and convert.device == "cuda"
    assert sl in {str(v) for v in vars(convert).values()}  # the slice is convert's input, whatever its name
    assert str(tmp_path / "converted") in {str(v) for v in vars(convert).values()}


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


def test_b200_options_lead_with_the_one_gpu_path():
    # pytest builds its parser privately; this one is only to read the options' defaults and choices
    from _pytest.config.argparsing import Parser

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parser = Parser()
    b200_conftest.add_b200_options(parser)
    default = parser.parse_known_args([])
    assert default.path == P.PATH_ONE_GPU == b200_conftest.NodeOptions.path
    assert (default.calib_samples, default.calib_seq_len, default.amax) == (128, 512, None)
    chosen = parser.parse_known_args(["--path", "bf16", "--calib-samples", "64", "--amax", "/data/a.st"])
    assert (chosen.path, chosen.calib_samples, chosen.amax) == (P.PATH_BF16, 64, "/data/a.st")


def test_b200_one_gpu_wrappers(tmp_path, tiny_release, monkeypatch):
    """The default path's tests on fake GPUs and RAM and the micro release's config; the BF16 path's
    tests skip, naming --path bf16, and the reverse."""
    config = Checkpoint.open(tiny_release).config
    node = fake_node(tmp_path)
    need = P.one_gpu_calibration_bytes(config)
    node_tests.test_gpu_for_calibrate(fake_gpus(1, free_bytes=need), node, config)
    with pytest.raises(pytest.fail.Exception, match=r"no GPU has .* free for dsv4 calibrate"):
        node_tests.test_gpu_for_calibrate(fake_gpus(8, free_bytes=need - 1), node, config)
    monkeypatch.setattr(P, "mem_available", lambda: P.one_gpu_ram_bytes(config))
    node_tests.test_ram_for_calibrate(node, config)
    monkeypatch.setattr(P, "mem_available", lambda: P.one_gpu_ram_bytes(config) - 1)
    with pytest.raises(pytest.fail.Exception, match="dsv4 calibrate needs"):
        node_tests.test_ram_for_calibrate(node, config)
    for bf16_only in (
        lambda: node_tests.test_gpus(fake_gpus(), node),
        lambda: node_tests.test_ram(fake_gpus(), node, []),
        lambda: node_tests.test_hf_ptq_dry_run(node),
        lambda: node_tests.test_canary_slice_dequant_quantize_convert_serve(tiny_release, node),
    ):
        with pytest.raises(pytest.skip.Exception, match="checks the one-gpu path \\(--path bf16\\)"):
            bf16_only()
    bf16 = fake_node(tmp_path, path=P.PATH_BF16)
    for one_gpu_only in (
        lambda: node_tests.test_gpu_for_calibrate(fake_gpus(), bf16, config),
        lambda: node_tests.test_ram_for_calibrate(bf16, config),
        lambda: node_tests.test_canary_slice_calibrate_convert_serve(tiny_release, bf16),
    ):
        with pytest.raises(pytest.skip.Exception, match="checks the bf16 path \\(--path one-gpu\\)"):
            one_gpu_only()
    # an AMAX already written: its work folder no longer counts
    plan = [(P.STEP_CALIBRATE, 10**18), (P.STEP_CONVERTED_AMAX, 1000)]
    with pytest.raises(pytest.fail.Exception, match="the run writes"):
        node_tests.test_disk_for_every_output(node, plan)
    amax = tmp_path / "amax.safetensors"
    amax.write_bytes(b"")
    node_tests.test_disk_for_every_output(fake_node(tmp_path, amax=amax), plan)


def test_b200_wrappers_pass_and_fail_with_the_check_messages(tmp_path):
    node = fake_node(tmp_path, path=P.PATH_BF16)
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
