"""The failure catalogue: every failure the seeds record (quantization Runs 1-11, serving attempts S1-S15)
-> the tests that catch it -> the tier that runs them -> how long before a run they fire.

Data, so that "no row without a test" is checked, not promised: tests/unit/test_failures.py fails if a
seed failure has no row, a row names no test, or a named test does not exist; docs/failures.md is
generated from this table (the same test keeps the file equal).
"""

from __future__ import annotations

from dataclasses import dataclass

LAPTOP = "on a laptop, in seconds, before anything is rented"
LAPTOP_QUANT = "on a laptop (quant env), in minutes, before anything is rented"
LAPTOP_VLLM = "on a laptop (vllm env), in minutes, before anything is rented"
GPU = "on any lent GPU (bench/gpu_tier.sh), minutes, before the node"
NODE = "on the node, in the <10 min preflight, before the 8-hour run"
AT_STEP = "at the step's start, from headers, before its long work"


@dataclass(frozen=True)
class Failure:
    id: str  # "Run 4", "S13.5"
    what: str  # what happened, in short
    tests: tuple[str, ...]  # pytest node ids (file::function), without parameters
    tier: str
    fires: str


_HF = "tests/unit/test_hf_ptq_driver.py::"
_SR = "tests/unit/test_serving_regressions.py::"
_Q = "tests/tiny/test_quantize.py::"

CATALOGUE: tuple[Failure, ...] = (
    Failure(
        "Run 1",
        "FP8 release handed to quantization: o_b_proj shape mismatch in batch probing",
        (
            _Q + "test_run1_release_fp8_source_is_refused_before_loading",
            "tests/unit/test_checkpoint_validate.py::test_fp8_checkpoint_where_bf16_is_needed",
        ),
        "unit, tiny",
        f"{LAPTOP}; {AT_STEP}",
    ),
    Failure(
        "Run 2",
        "export read stale GPU amax after hours of calibration: CUDA illegal memory access",
        (
            _Q + "test_report_records_patches_reached_and_versions",
            "tests/gpu/test_cuda_paths.py::test_export_on_cuda_moves_gpu_tensors_and_matches_the_cpu_weights",
        ),
        "tiny, gpu",
        f"{LAPTOP_QUANT} (patch reached); {GPU} (on CUDA tensors)",
    ),
    Failure(
        "Run 3",
        "AutoModelForCausalLM.from_pretrained OOM concatenating expert weights on one GPU",
        (
            _HF + "test_the_driver_never_loads_the_model_itself",
            _HF + "test_main_loads_the_model_through_hf_ptq_load_model",
            "tests/crosscheck/test_hf_ptq_contract.py::test_run3_load_model_goes_through_get_model_with_a_memory_cap",
        ),
        "unit, quant",
        LAPTOP,
    ),
    Failure(
        "Run 4",
        "mtq.KV_QUANT_CFG_CHOICES does not exist (it is hf_ptq's)",
        (_HF + "test_kv_choices_come_from_the_hf_ptq_module_not_mtq",),
        "unit",
        LAPTOP,
    ),
    Failure(
        "Run 5",
        "the fix of Run 4 was not synced to the node: stale code ran",
        (
            "tests/unit/test_repo_contract.py::test_run5_the_code_digest_names_stale_code",
            "tests/unit/test_preflight.py::test_code_digest_mismatch_names_run_5",
            "tests/b200/test_node_preflight.py::test_code_is_what_the_laptop_tested",
        ),
        "unit, b200",
        f"{LAPTOP} (the digest changes); {NODE} (--expect-code compares it)",
    ),
    Failure(
        "Run 6",
        "make_calib_dataloader AttributeError: a hand-built Namespace lacked attributes",
        (_HF + "test_every_attribute_main_reads_exists_on_the_parsed_args",),
        "unit",
        LAPTOP,
    ),
    Failure(
        "Run 7",
        "dataset=None: len() on None",
        (
            _HF + "test_stub_main_rejects_what_runs_7_and_9_passed",
            _HF + "test_parsed_and_converted_args_have_the_types_main_needs",
        ),
        "unit",
        LAPTOP,
    ),
    Failure(
        "Run 8",
        "argparse crash: the shell script's flag names instead of hf_ptq.py's",
        (_HF + "test_argv_uses_hf_ptq_flag_names_never_the_shell_scripts",),
        "unit",
        LAPTOP,
    ),
    Failure(
        "Run 9",
        "TypeError: hf_ptq's __main__ conversions skipped (calib_size still a string)",
        (
            _HF + "test_stub_main_rejects_what_runs_7_and_9_passed",
            _HF + "test_quantize_cli_hf_ptq_driver_prints_the_parsed_and_converted_args",
        ),
        "unit",
        LAPTOP,
    ),
    Failure(
        "Run 10",
        "export read stale GPU weights: cudaErrorIllegalAddress in get_weight_scaling_factor",
        (
            "tests/gpu/test_cuda_paths.py::test_export_on_cuda_moves_gpu_tensors_and_matches_the_cpu_weights",
            "tests/gpu/test_hf_ptq_gpu.py::test_hf_ptq_driver_quantizes_on_cuda_and_the_export_converts",
            "tests/b200/test_node_preflight.py::test_canary_slice_dequant_quantize_convert_serve",
        ),
        "gpu, b200",
        f"{GPU}; {NODE} (the canary quantizes a 2-layer slice with CUDA)",
    ),
    Failure(
        "Run 11",
        "succeeded only with 8 unchecked in-memory patches, one silently dead since ModelOpt 0.46",
        (
            _Q + "test_every_patch_target_matches_the_installed_modelopt",
            _Q + "test_seeds_patch_on_the_moved_export_fused_experts_is_never_reached",
            _Q + "test_a_changed_signature_is_refused",
            "tests/b200/test_node_preflight.py::test_modelopt_patch_targets_are_present",
        ),
        "tiny",
        f"{LAPTOP_QUANT}; {NODE} (targets checked against the node's ModelOpt)",
    ),
    Failure(
        "S1",
        "UnboundLocalError name_mapped: expert gate_proj/up_proj/down_proj matched no rule",
        (_SR + "test_s1_s4_expert_projections_land_on_w1_w2_w3_under_ffn",),
        "unit",
        LAPTOP,
    ),
    Failure(
        "S2",
        "a patched mapper function never reached the mapper vLLM had cached as a class attribute at import",
        (
            "tests/crosscheck/test_vllm_plugin.py::test_the_registered_class_loads_an_export_with_vllms_own_loader",
            "tests/crosscheck/test_vllm_plugin.py::test_registering_changes_nothing_vllm_does_for_other_checkpoints",
        ),
        "vllm",
        f"{LAPTOP_VLLM}; no patching at all: `dsv4 convert` writes native names, or the plugin registers a class",
    ),
    Failure(
        "S3",
        "the launcher's in-memory patch did not reach vLLM's worker processes",
        (
            "tests/crosscheck/test_vllm_plugin.py::test_vllms_plugin_loader_registers_the_architecture_in_a_spawned_process",
        ),
        "vllm",
        f"{LAPTOP_VLLM}; the plugin is a vllm.general_plugins entry point, which vLLM loads in every process",
    ),
    Failure(
        "S4",
        "KeyError layers.0.mlp.experts.0.w2.weight: mlp is transformers' name, ffn the release's",
        (
            _SR + "test_s1_s4_expert_projections_land_on_w1_w2_w3_under_ffn",
            "tests/crosscheck/test_mapping_vllm.py::test_vllm_refuses_the_names_the_table_renames",
        ),
        "unit, vllm",
        LAPTOP,
    ),
    Failure(
        "S5",
        "KeyError fused_wkv_wgate.input_scale: NVFP4 siblings where vLLM has no parameter",
        (_SR + "test_s5_s8_no_nvfp4_sibling_outside_the_routed_experts",),
        "unit",
        LAPTOP,
    ),
    Failure(
        "S6",
        "shape mismatch w2_weight_scale (7168, 96) vs (7168, 192): deep_gemm_mega_moe reads MXFP4 32-column "
        "scales, the checkpoint has NVFP4 16-column ones",
        (
            "tests/unit/test_serve.py::test_deep_gemm_mega_moe_is_refused_with_the_s6_reason",
            "tests/unit/test_serve.py::test_cli_refuses_mega_moe_before_touching_the_checkpoint",
            "tests/crosscheck/test_serve_vllm.py::test_mega_moe_experts_take_mxfp4_scales_and_reject_nvfp4_ones_as_in_s6",
        ),
        "unit, vllm",
        f"{LAPTOP}; `dsv4 serve` refuses the flag before it starts vLLM",
    ),
    Failure(
        "S7",
        "fused_wkv_wgate shape mismatch: packed uint8 NVFP4 into a BF16 parameter",
        (_SR + "test_s7_compressor_and_indexer_weights_are_unpacked_bf16",),
        "unit",
        LAPTOP,
    ),
    Failure(
        "S8",
        "KeyError fused_wkv_wgate.weight_scale",
        (_SR + "test_s5_s8_no_nvfp4_sibling_outside_the_routed_experts",),
        "unit",
        LAPTOP,
    ),
    Failure(
        "S9",
        "KeyError compressor.kv_norm; the seeds' fix then overwrote the attention's kv_norm",
        (_SR + "test_s9_the_compressor_norm_does_not_overwrite_the_attention_kv_norm",),
        "unit",
        LAPTOP,
    ),
    Failure(
        "S10",
        "KeyError compressor.position_bias; the seeds then skipped unknown keys, dropping ape",
        (
            _SR + "test_s10_position_bias_is_kept_as_ape",
            "tests/crosscheck/test_mapping_vllm.py::test_vllm_refuses_the_names_the_table_renames",
        ),
        "unit, vllm",
        LAPTOP,
    ),
    Failure(
        "S11",
        "vLLM's attention reads FP8 weights directly (deepseek_v4_fp8_einsum), bypassing quant_method",
        (_SR + "test_s11_s13_s13_5_s15_every_non_expert_tensor_has_the_release_dtype_and_shape",),
        "unit",
        LAPTOP,
    ),
    Failure(
        "S12",
        ".mla_attn. prefix and head.weight -> lm_head.weight renamed twice",
        (
            _SR + "test_s12_no_mla_attn_prefix_and_one_head",
            "tests/crosscheck/test_mapping_vllm.py::test_vllm_mapper_on_our_target_keys",
        ),
        "unit, vllm",
        LAPTOP,
    ),
    Failure(
        "S13",
        "MergedColumnParallelLinear has no weight_scale_inv: fused_wqa_wkv not FP8 with scales",
        (_SR + "test_s11_s13_s13_5_s15_every_non_expert_tensor_has_the_release_dtype_and_shape",),
        "unit",
        LAPTOP,
    ),
    Failure(
        "S13.5",
        "wo_a left BF16 by ModelOpt where vLLM reads FP8 + scale",
        (_SR + "test_s13_5_wo_a_is_the_exports_bf16_quantized_to_fp8_tiles",),
        "unit",
        LAPTOP,
    ),
    Failure(
        "S14",
        "E2M1 LUT indexed with the sign bit (CUDA assert); sign handling untested",
        (
            _SR + "test_s14_negative_codes_survive_the_nvfp4_to_fp8_requant",
            "tests/unit/test_e2m1_exhaustive.py",
        ),
        "unit",
        LAPTOP,
    ),
    Failure(
        "S15",
        "BFloat16 != Float8_e4m3fn: FP8 put where vLLM computes in BF16",
        (_SR + "test_s11_s13_s13_5_s15_every_non_expert_tensor_has_the_release_dtype_and_shape",),
        "unit",
        LAPTOP,
    ),
)

SEED_FAILURES: tuple[str, ...] = (
    *(f"Run {i}" for i in range(1, 12)),
    *(f"S{i}" for i in range(1, 16)),
    "S13.5",
)


def markdown() -> str:
    """docs/failures.md."""
    lines = [
        "# Failure catalogue",
        "",
        "Every failure in the seeds (quantization Runs 1–11, serving attempts S1–S15) → the tests that",
        "catch it → the tier that runs them → when they fire. Generated from `harness/failures.py`;",
        "`tests/unit/test_failures.py` checks that every seed failure has a row, every row names tests,",
        "every named test exists, and that this file equals the table. Regenerate:",
        "",
        "```",
        "python -c 'from harness.failures import markdown; print(markdown(), end=\"\")' > docs/failures.md",
        "```",
        "",
        "| failure | what happened | caught by | tier | fires |",
        "|---|---|---|---|---|",
    ]
    for f in sorted(CATALOGUE, key=lambda f: SEED_FAILURES.index(f.id)):
        tests = "<br>".join(f"`{t}`" for t in f.tests)
        lines.append(f"| {f.id} | {f.what} | {tests} | {f.tier} | {f.fires} |")
    return "\n".join(lines) + "\n"
