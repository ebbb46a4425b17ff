"""The preflight on the 8xB200 node, before spending a run: `pytest -m b200 --source RELEASE [--path
one-gpu|bf16] [--amax AMAX] [--export EXPORT] [--converted CKPT] [--modelopt-repo REPO] [--expect-code
DIGEST] [--vllm-python PY] [--gsm8k]`.

``--path one-gpu`` (the default) checks for issue 16's path: `dsv4 calibrate` one layer at a time on one
GPU, then `dsv4 convert RELEASE --amax`; ``--path bf16`` for the seeds' path through a BF16 copy and
ModelOpt on 8 GPUs. A check of the other path skips, naming the option that selects it.

Each test is one check, and its failure says what to do (docs/preflight.md lists them with the seed
failure each prevents). The logic lives in harness/preflight.py, unit-tested on CPU against fakes and the
full-scale sparse replica (tests/preflight/test_preflight.py); these tests gather the node's facts and assert.
Off the node they skip: harness/markers.py's b200 tier needs a compute capability 10.x GPU.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from harness import preflight as P
from pipeline.checkpoint import Layout, validate_checkpoint
from pipeline.provenance import code_digest

pytestmark = pytest.mark.b200

SAMPLE_SCALES = 16  # header-only validation: every header, 16 sampled scale tensors


def fail_with(problems: list[str]) -> None:
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


def only_on(node, path: str) -> None:
    """Skip a check of the path this run does not take, saying how to select it."""
    if node.path != path:
        pytest.skip(f"a check of the {path} path; this preflight checks the {node.path} path (--path {path})")


# ---- hardware ----------------------------------------------------------------------------------------


def test_gpu_for_calibrate(gpus, node, source_config):
    """one-gpu: a GPU with room for `dsv4 calibrate`'s largest layer in BF16 and its activations."""
    only_on(node, P.PATH_ONE_GPU)
    parts = P.one_gpu_calibration_memory(source_config, node.calib_samples, node.calib_seq_len)
    need = sum(n for _, n in parts)
    fits = P.calibration_gpus(gpus, need)
    print(
        f"\ndsv4 calibrate on one GPU ({node.calib_samples} x {node.calib_seq_len} tokens):\n{P.format_memory(parts)}"
    )
    print(f"GPUs with room: {fits} (dsv4 calibrate --device cuda:N)")
    fail_with(P.check_calibration_gpu(gpus, need))


def test_ram_for_calibrate(node, source_config):
    """one-gpu: host RAM for one layer's release bytes, its page cache and the activations' host copies."""
    only_on(node, P.PATH_ONE_GPU)
    parts = P.one_gpu_ram_memory(source_config, node.calib_samples, node.calib_seq_len)
    print("\nhost RAM of the one-GPU path:\n" + P.format_memory(parts))
    fail_with(P.check_ram(P.mem_available(), sum(n for _, n in parts), P.PATH_ONE_GPU))


def test_gpus(gpus, node):
    """bf16: 8 Blackwell GPUs, each nearly all free, for hf_ptq's calibration across them."""
    only_on(node, P.PATH_BF16)
    fail_with(P.check_gpus(gpus, count=node.gpus))


def test_ram(gpus, node, disk_plan):
    """bf16: the BF16 model less what the GPUs hold, in host RAM."""
    only_on(node, P.PATH_BF16)
    bf16 = dict(disk_plan)[P.STEP_BF16]
    fail_with(P.check_ram(P.mem_available(), P.ram_needed(bf16, sum(g.total_bytes for g in gpus))))


def test_disk_for_every_output(node, disk_plan):
    """Both paths: the plan of ``--path`` (one_gpu_disk_plan or disk_plan) against the free space."""
    print(f"\ndisk plan of the {node.path} path:\n" + P.format_disk_plan(disk_plan))
    done = P.steps_done(
        export=bool(node.export and node.export.is_dir()),
        amax=bool(node.amax and node.amax.is_file()),
        converted=bool(node.converted and node.converted.is_dir()),
    )
    where, free = P.free_bytes(node.outputs)
    fail_with(P.check_disk(disk_plan, free, done=done, where=str(where)))


# ---- software ----------------------------------------------------------------------------------------


def test_quant_env_versions_match_the_pins():
    fail_with(P.version_mismatches(P.installed_versions(P.QUANT_PACKAGES)))


def test_serving_env_vllm_version(node):
    fail_with(P.check_vllm_version(P.vllm_version(node.vllm_python), node.target_vllm, node.vllm_python))


def test_code_is_what_the_laptop_tested(node):
    if not node.expect_code:
        pytest.skip(f"pass --expect-code DIGEST (`dsv4 --version` on the laptop; here: {code_digest()})")
    fail_with(P.check_code(node.expect_code, code_digest()))


def test_modelopt_patch_targets_are_present():
    from patches.modelopt_patches import PatchTargetError, check_targets

    try:
        check_targets()
    except PatchTargetError as err:
        pytest.fail(f"{err}\nupdate patches/modelopt_patches.py for the installed ModelOpt", pytrace=False)


def test_hf_ptq_dry_run(node):
    only_on(node, P.PATH_BF16)  # the one-GPU path runs no hf_ptq
    if node.modelopt_repo is None:
        pytest.skip("pass --modelopt-repo REPO (the Model-Optimizer checkout the run's hf_ptq.py comes from)")
    out = node.outputs or Path(tempfile.gettempdir())
    result = P.hf_ptq_dry_run(node.modelopt_repo, str(out / "v4-bf16"), str(out / "v4-nvfp4-export"))
    print("\nhf_ptq.py " + " ".join(result["argv"]))
    fail_with(result["problems"])


# ---- checkpoints, from headers -----------------------------------------------------------------------


def _validate(path: Path, layout: Layout, what: str) -> None:
    report = validate_checkpoint(path, sample_size=SAMPLE_SCALES, expect=layout, step=f"the run ({what})")
    fail_with([f"{p} (run `dsv4 validate {path}` for the full list)" for p in report.problems[:20]])


def test_source_headers(source):
    _validate(source, Layout.RELEASE, "the release")


def test_export_headers(node):
    if node.export is None:
        pytest.skip("pass --export EXPORT to validate a ModelOpt export before converting it")
    _validate(node.export, Layout.NVFP4, "a ModelOpt NVFP4 export")


def test_converted_headers(node):
    if node.converted is None:
        pytest.skip("pass --converted CKPT to validate a `dsv4 convert` output before serving it")
    _validate(node.converted, Layout.NVFP4, "a converted checkpoint")


# ---- the canary: the whole pipeline on 2 layers x 8 experts of the release, on the real kernels -------


def test_canary_slice_calibrate_convert_serve(source, node):
    """one-gpu: slice -> calibrate (16 x 64 tokens, one layer at a time) -> convert --amax -> serve."""
    only_on(node, P.PATH_ONE_GPU)
    steps = P.one_gpu_canary_steps(
        source,
        node.canary_dir,
        vllm_bin=P.vllm_bin_for(node.vllm_python),
        tensor_parallel=node.gpus,
        target_vllm=node.target_vllm,
    )
    run_canary(steps, node)


def test_canary_slice_dequant_quantize_convert_serve(source, node):
    """bf16: slice -> dequant -> quantize (ModelOpt, 16 x 64 tokens) -> convert --graft-from -> serve."""
    only_on(node, P.PATH_BF16)
    steps = P.canary_steps(
        source,
        node.canary_dir,
        vllm_bin=P.vllm_bin_for(node.vllm_python),
        tensor_parallel=node.gpus,
        target_vllm=node.target_vllm,
    )
    run_canary(steps, node)


def run_canary(steps: list[P.CanaryStep], node) -> None:
    """Each step in turn, its output's tail printed; the first that fails or times out fails the test."""
    workdir = node.canary_dir
    for step in steps:
        result = P.run_step(step, workdir / "logs")
        print(f"\ncanary {step.name}: exit {result.returncode} in {result.seconds:.0f} s\n{result.tail}")
        if not result.ok:
            why = "timed out" if result.returncode == -1 else f"exit {result.returncode}"
            pytest.fail(
                f"canary step {step.name} {why} after {result.seconds:.0f} s ({result.log}):\n{result.tail}",
                pytrace=False,
            )
    if not node.keep_canary:
        shutil.rmtree(workdir, ignore_errors=True)


# ---- optional: GSM8K through lm-evaluation-harness's vLLM backend ------------------------------------


def test_gsm8k(node):
    if not node.gsm8k:
        pytest.skip("pass --gsm8k (with --converted CKPT) to score GSM8K through lm-evaluation-harness")
    if node.converted is None:
        pytest.skip("--gsm8k scores --converted CKPT: pass the `dsv4 convert` output")
    missing = P.module_missing(node.vllm_python, "lm_eval")
    if missing:
        pytest.skip(
            f"lm-evaluation-harness is not installed in the serving env ({missing}): pip install lm_eval"
        )
    out = (node.outputs or Path(tempfile.gettempdir())) / "dsv4-gsm8k"
    argv = P.gsm8k_argv(
        node.vllm_python,
        node.converted,
        out,
        tensor_parallel=node.gpus,
        limit=node.gsm8k_limit or None,
        tokenizer=node.source,
    )
    result = P.run_step(P.CanaryStep("gsm8k", argv, 3 * 3600), out)
    if not result.ok:
        pytest.fail(f"lm_eval exit {result.returncode} ({result.log}):\n{result.tail}", pytrace=False)
    score, metric, path = P.gsm8k_score(out)
    print(f"\nGSM8K {metric}: {score:.4f} ({path})")
    if score < node.gsm8k_threshold:
        pytest.fail(
            f"GSM8K {metric} {score:.4f} < {node.gsm8k_threshold} ({path}): the quantized model lost accuracy; "
            "compare with the BF16 model and the experts/transcode recipes before serving it",
            pytrace=False,
        )


# ---- recipe transcode: how much of the release transcodes exactly ------------------------------------


def test_transcode_scan_of_the_release(source):
    """Before choosing `dsv4 convert --experts transcode`: the fraction of the release's expert groups
    (w1+w3 sharing m, and w2) whose block exponents fit e4m3's 17-octave window, read from the scales
    only (`dsv4 transcode-scan`; a lower bound, see pipeline/transcode_scan.py). Informational: printed,
    and fails only if the scan itself cannot read the release."""
    from pipeline.checkpoint import Checkpoint
    from pipeline.transcode_scan import scan

    report = scan(Checkpoint.open(source))
    assert report.groups > 0
    print(
        f"\ntranscode-scan: {report.exact} of {report.groups} expert groups exact "
        f"({100 * report.exact_fraction:.2f} %); worst spreads {report.worst[:3]}"
    )
