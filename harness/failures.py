"""The failure catalogue: every failure the seed notes record (Run N, SN, Config N: README.md, "Terms")
-> the tests that catch it -> the tier that runs them -> how long before a run they fire.

Data, so that "no row without a test" is checked, not promised: tests/harness/test_failures.py fails if a
seed failure has no row, a row names no test, or a named test does not exist; docs/failures.md is
generated from this table (the same test keeps the file equal).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The seed notes (README.md, "Terms"), beside the clone as CI has them; not part of the repository.
SEED_NOTES = ROOT.parent / "shared" / "seeds"
# What the notes record, extracted by EXTRACTION_RULES and committed so that the catalogue is checked
# against the notes even where they are absent (tests/harness/test_failures.py re-extracts when present).
SEED_FAILURES_FILE = ROOT / "fixtures" / "seed_failures.json"

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


_HF = "tests/quantize/test_hf_ptq_driver.py::"
_SR = "tests/serve/test_serving_regressions.py::"
_Q = "tests/quantize/test_quantize.py::"
_FC = "tests/vllm_config/test_fix_config.py::"

CATALOGUE: tuple[Failure, ...] = (
    Failure(
        "Run 1",
        "FP8 release handed to quantization: o_b_proj shape mismatch in batch probing",
        (
            _Q + "test_run1_release_fp8_source_is_refused_before_loading",
            _HF + "test_quantize_cli_hf_ptq_driver_refuses_a_release_fp8_source",
            "tests/checkpoint/test_checkpoint_validate.py::test_fp8_checkpoint_where_bf16_is_needed",
        ),
        "unit, tiny",
        f"{LAPTOP}; {AT_STEP}",
    ),
    Failure(
        "Run 2",
        "export read stale GPU amax after hours of calibration: CUDA illegal memory access",
        (
            _Q + "test_report_records_patches_reached_and_versions",
            "tests/device/test_cuda_paths.py::test_export_on_cuda_moves_gpu_tensors_and_matches_the_cpu_weights",
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
            "tests/quantize/test_hf_ptq_contract.py::test_run3_load_model_goes_through_get_model_with_a_memory_cap",
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
            "tests/repo/test_repo_contract.py::test_run5_the_code_digest_names_stale_code",
            "tests/preflight/test_preflight.py::test_code_digest_mismatch_names_run_5",
            "tests/preflight/test_node_preflight.py::test_code_is_what_the_laptop_tested",
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
            "tests/device/test_cuda_paths.py::test_export_on_cuda_moves_gpu_tensors_and_matches_the_cpu_weights",
            "tests/quantize/test_hf_ptq_gpu.py::test_hf_ptq_driver_quantizes_on_cuda_and_the_export_converts",
            "tests/preflight/test_node_preflight.py::test_canary_slice_dequant_quantize_convert_serve",
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
            _Q + "test_a_drifted_patch_target_is_a_one_line_refusal",
            _Q + "test_report_records_patches_reached_and_versions",
            _Q + "test_hf_ptq_driver_refuses_an_export_that_never_reached_the_patches",
            "tests/preflight/test_node_preflight.py::test_modelopt_patch_targets_are_present",
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
            "tests/plugin/test_vllm_plugin.py::test_the_registered_class_loads_an_export_with_vllms_own_loader",
            "tests/plugin/test_vllm_plugin.py::test_registering_changes_nothing_vllm_does_for_other_checkpoints",
        ),
        "vllm",
        f"{LAPTOP_VLLM}; no patching at all: `dsv4 convert` writes native names, or the plugin registers a class",
    ),
    Failure(
        "S3",
        "the launcher's in-memory patch did not reach vLLM's worker processes",
        (
            "tests/plugin/test_vllm_plugin.py::test_vllms_plugin_loader_registers_the_architecture_in_a_spawned_process",
        ),
        "vllm",
        f"{LAPTOP_VLLM}; the plugin is a vllm.general_plugins entry point, which vLLM loads in every process",
    ),
    Failure(
        "S4",
        "KeyError layers.0.mlp.experts.0.w2.weight: mlp is transformers' name, ffn the release's",
        (
            _SR + "test_s1_s4_expert_projections_land_on_w1_w2_w3_under_ffn",
            "tests/mapping/test_mapping_vllm.py::test_vllm_refuses_the_names_the_table_renames",
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
            "tests/serve/test_serve.py::test_deep_gemm_mega_moe_is_refused_with_the_s6_reason",
            "tests/serve/test_serve.py::test_cli_refuses_mega_moe_before_touching_the_checkpoint",
            "tests/serve/test_serve_vllm.py::test_mega_moe_experts_take_mxfp4_scales_and_reject_nvfp4_ones_as_in_s6",
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
            "tests/mapping/test_mapping_vllm.py::test_vllm_refuses_the_names_the_table_renames",
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
            "tests/mapping/test_mapping_vllm.py::test_vllm_mapper_on_our_target_keys",
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
            "tests/formats/test_e2m1_exhaustive.py",
        ),
        "unit",
        LAPTOP,
    ),
    Failure(
        "Config 1",
        "the export lacks compress_ratios (transformers 5.8 renamed it compress_rates); vLLM indexes it by layer",
        (
            _FC + "test_missing_compress_ratios_is_restored",
            _FC + "test_compress_ratios_match_the_real_release",
        ),
        "unit",
        f"{LAPTOP}; `dsv4 fix-config` writes it",
    ),
    Failure(
        "Config 2",
        "the export lacks quantization_config.scale_fmt; vLLM needs 'ue8m0'",
        (_FC + "test_missing_scale_fmt_is_added",),
        "unit",
        f"{LAPTOP}; `dsv4 fix-config` writes it",
    ),
    Failure(
        "Config 3",
        "rope_parameters nested per component (transformers 5.8); vLLM reads a flat dict",
        (
            _FC + "test_nested_rope_is_flattened_from_the_yarn_subdict",
            _FC + "test_rope_thetas_restored_from_nested_params",
        ),
        "unit",
        f"{LAPTOP}; `dsv4 fix-config` flattens it (from the YaRN sub-dict, not 'main' as the seeds did)",
    ),
    Failure(
        "Config 4",
        "rope_scaling nested the same way",
        (
            _FC + "test_nested_rope_is_flattened_from_the_yarn_subdict",
            _FC + "test_rope_from_047_export_without_rope_scaling",
        ),
        "unit",
        f"{LAPTOP}; `dsv4 fix-config` writes the release's rope_scaling",
    ),
    Failure(
        "low_memory_mode",
        "hf_ptq --low_memory_mode: meta device errors with V4",
        (_HF + "test_low_memory_mode_is_never_passed_to_hf_ptq",),
        "unit",
        LAPTOP,
    ),
    Failure(
        "calib_size=256",
        "256 calibration samples ran out of memory with 3 TB of BF16 offloaded to CPU",
        (_HF + "test_calib_size_above_run_11s_128_is_refused_on_the_node",),
        "unit",
        f"{LAPTOP}; `dsv4 quantize --driver hf_ptq` refuses more than Run 11's 128",
    ),
    Failure(
        "kernels package",
        "transformers' FP8 ops need the `kernels` package: they ran because the source was FP8",
        (
            _Q + "test_run1_release_fp8_source_is_refused_before_loading",
            _HF + "test_quantize_cli_hf_ptq_driver_refuses_a_release_fp8_source",
        ),
        "unit, tiny",
        f"{LAPTOP}; both drivers take only the BF16 checkpoint, so no FP8 op runs in quantization",
    ),
    Failure(
        "activation-scale assert",
        "export died on assert torch.all(activation_scaling_factor > 0): an input amax of 0 or NaN",
        (
            _Q + "test_clamp_patch_turns_the_045_assert_into_a_reported_clamp",
            _Q + "test_modelopt_047_substitutes_maxbound_for_a_zero_input_amax",
        ),
        "tiny",
        LAPTOP_QUANT,
    ),
    Failure(
        "w1/w3 weight_scale_2",
        "vLLM warned w1_weight_scale_2 must match w3_weight_scale_2 and kept w1's for the fused w13",
        (
            "tests/convert/test_convert.py::test_w1_w3_global_scales_are_unified_and_the_error_is_measured",
            "tests/convert/test_convert.py::test_hf_ptq_mtp_block_is_quantized_without_the_release",
            _Q + "test_w1_and_w3_share_their_global_scale",
        ),
        "unit, tiny",
        f"{LAPTOP}; `dsv4 convert` gives both the larger global scale and reports the error",
    ),
    Failure(
        "S15",
        "BFloat16 != Float8_e4m3fn: FP8 put where vLLM computes in BF16",
        (_SR + "test_s11_s13_s13_5_s15_every_non_expert_tensor_has_the_release_dtype_and_shape",),
        "unit",
        LAPTOP,
    ),
)

_OS = "tests/checkpoint/test_output_safety.py::"
_HR = "tests/checkpoint/test_hostile_reading.py::"
_HI = "tests/cli/test_hostile_inputs.py::"
_SIG = "tests/cli/test_signals.py::"
_HC = "tests/cli/test_hostile_concurrent.py::"
_HQ = "tests/quantize/test_hostile_quantize.py::"
LAPTOP_SLOW = "on a laptop, `tox -e unit` (slow tier), in minutes, before anything is rented"

# What the project's own reviews found (issues 13 and 17): the bug -> the tests that fail when it is
# re-introduced. Same checks as the seed catalogue (every named test exists; docs/failures.md is this).
FINDINGS: tuple[Failure, ...] = (
    Failure(
        "#13 overwrite",
        "`--overwrite` deleted a folder no dsv4 run wrote (the release, by a slip for --graft-from)",
        (
            _OS + "test_overwrite_refuses_a_folder_dsv4_did_not_write",
            _OS + "test_overwrite_refuses_our_output_holding_a_stray_file",
            _OS + "test_quantize_overwrite_refuses_a_folder_without_its_report",
            _HI + "test_overwrite_of_a_folder_no_dsv4_run_wrote_is_refused",
            _HQ + "test_overwrite_of_a_folder_dsv4_quantize_did_not_write_is_refused",
        ),
        "slow, tiny",
        LAPTOP_SLOW,
    ),
    Failure(
        "#13 resume changed input",
        "`--resume` kept shards made from other input bytes and reported success",
        (
            _OS + "test_resume_refuses_an_input_changed_since_the_run_began",
            _OS + "test_an_input_changed_while_being_read_leaves_no_index",
            _HI + "test_resume_after_the_input_changed_is_refused",
        ),
        "slow",
        LAPTOP_SLOW,
    ),
    Failure(
        "#13 two runs",
        "two runs into one output folder raced on the progress journal",
        (
            _OS + "test_a_second_run_is_refused_naming_the_holder",
            _OS + "test_writer_lock_file_is_removed_and_a_stale_one_is_ours",
            _HC + "test_second_run_into_a_folder_being_written_is_refused",
            _HC + "test_lock_left_by_a_killed_run_does_not_block_resume",
            _HQ + "test_second_quantize_into_a_destination_being_written_is_refused",
        ),
        "slow, tiny",
        LAPTOP_SLOW,
    ),
    Failure(
        "#13 FIFO",
        "a shard, index or config that is a FIFO blocked every command forever",
        (
            _HR + "test_a_shard_that_is_a_fifo_is_refused_without_opening_it",
            _HR + "test_an_index_or_config_that_is_a_fifo_is_refused",
            _HR + "test_fix_config_refuses_a_fifo_config",
            _HI + "test_non_regular_input_file_is_refused_without_hanging",
        ),
        "unit, slow",
        f"{LAPTOP}; {AT_STEP}",
    ),
    Failure(
        "#13 outside the folder",
        "a weight_map entry `../x` or absolute was opened and validated; subfolders vLLM ignores passed",
        (
            _HR + "test_a_shard_outside_the_top_folder_is_refused",
            _HI + "test_weight_map_entry_outside_the_folder_is_refused",
        ),
        "unit, slow",
        f"{LAPTOP}; {AT_STEP}",
    ),
    Failure(
        "#13 unsampled scale",
        "a zero/NaN/Inf/negative weight_scale_2 validation did not sample: ValueError traceback in convert",
        (
            _HR + "test_convert_names_an_unsampled_bad_weight_scale_2",
            _HR + "test_an_action_refusing_a_value_names_the_file_and_key",
            _HI + "test_bad_scale_outside_the_validation_sample_is_refused",
        ),
        "unit, slow",
        LAPTOP,
    ),
    Failure(
        "#13 Ctrl-C",
        "Ctrl-C printed a KeyboardInterrupt traceback instead of what is on disk and --resume",
        (
            _OS + "test_ctrl_c_says_what_is_kept_and_resume_finishes",
            "tests/cli/test_interrupt_resume.py::test_dequant_sigint_then_resume_is_byte_identical",
            "tests/cli/test_interrupt_resume.py::test_convert_sigint_then_resume_is_byte_identical",
        ),
        "slow",
        LAPTOP_SLOW,
    ),
    Failure(
        "#13 OSError",
        "a read-only output file system gave a traceback, and the cleanup's error hid the first",
        (
            _OS + "test_read_only_output_is_one_line_naming_the_shard",
            _OS + "test_a_failing_cleanup_does_not_hide_the_first_error",
            _OS + "test_an_os_error_no_step_caught_is_still_one_line",
            _OS + "test_an_output_dir_that_cannot_be_created_is_one_line",
            _HI + "test_read_only_output_file_system_is_one_line",
        ),
        "slow",
        LAPTOP_SLOW,
    ),
    Failure(
        "#13 quantize refusals",
        "`dsv4 quantize` into a file, or without ModelOpt, gave a traceback",
        (
            _HF + "test_quantize_into_a_file_is_refused",
            _HF + "test_quantize_without_modelopt_names_the_package_and_how_to_install_it",
            _HI + "test_output_path_that_is_a_file_is_refused",
            _HI + "test_quantize_without_modelopt_is_one_line",
        ),
        "unit, slow",
        LAPTOP,
    ),
    Failure(
        "#13 PatchTargetError",
        "a drifted ModelOpt patch target: traceback and exit 1 instead of one line and exit 2",
        (_Q + "test_a_drifted_patch_target_is_a_one_line_refusal",),
        "tiny",
        LAPTOP_QUANT,
    ),
    Failure(
        "#13 quantization_config",
        "validate accepted a quant_method that does not describe the tensors; slice copied it on",
        (
            _HR + "test_a_quantization_config_that_does_not_describe_the_tensors",
            _HI + "test_quantization_config_that_does_not_describe_the_tensors_is_refused",
        ),
        "unit, slow",
        f"{LAPTOP}; {AT_STEP}",
    ),
    Failure(
        "#13 NaN values",
        "dequant wrote an all-NaN tensor from an unsampled NaN scale; NaN FP8 weights passed silently",
        (
            _HR + "test_dequant_stops_at_a_bad_value_before_its_shard_completes",
            _HI + "test_nan_weight_is_refused_naming_it",
        ),
        "unit, slow",
        LAPTOP,
    ),
    Failure(
        "#13 duplicate key",
        "a key twice in one header was reported as a problem with an unrelated key",
        (
            _HR + "test_a_key_twice_in_a_header_is_named",
            _HI + "test_key_twice_in_one_header_is_refused_naming_it",
        ),
        "unit, slow",
        f"{LAPTOP}; {AT_STEP}",
    ),
    Failure(
        "#13 transcode report",
        "the below-window report broadcast to [n, n, 32]: wrong error, quadratic memory (OOM on the node)",
        (
            "tests/formats/test_transcode_report.py::test_relative_and_max_error_match_an_independent_decode",
            "tests/formats/test_transcode_report_memory.py::test_report_memory_is_linear_in_the_blocks_below_the_window",
        ),
        "unit, slow",
        LAPTOP,
    ),
    Failure(
        "#13 fsync",
        "nothing checked that shards are fsynced before they are renamed",
        (_OS + "test_each_shard_is_fsynced_before_its_rename_and_the_dir_after",),
        "slow",
        LAPTOP_SLOW,
    ),
    Failure(
        "#13 MTP global scale",
        "the MTP BF16->NVFP4 global-scale test had equal amax, so min instead of max passed",
        ("tests/convert/test_convert.py::test_hf_ptq_mtp_block_is_quantized_without_the_release",),
        "unit",
        LAPTOP,
    ),
    Failure(
        "#13 CI skips",
        "without ../shared the unit tier skipped the only check of release_layout against the real table",
        (
            "tests/checkpoint/test_release_layout.py::test_without_the_reference_ci_fails_where_a_fresh_clone_skips",
        ),
        "unit",
        LAPTOP,
    ),
    Failure(
        "#13 validate mid-run",
        "`dsv4 validate` called a folder a run was still writing (no index yet) a valid checkpoint",
        (_HC + "test_validate_of_a_folder_being_written_does_not_call_it_valid",),
        "slow",
        LAPTOP_SLOW,
    ),
    Failure(
        "#13 quantize paths",
        "the hf_ptq driver exported into a non-empty, foreign or source folder; a foreign DST.calibration "
        "was deleted; a bad --calib-file cost a model load or gave a traceback",
        (
            _HQ + "test_hf_ptq_driver_refuses_a_destination_it_must_not_write",
            _HQ + "test_a_foreign_folder_where_the_calibrated_state_goes_is_refused",
            _HQ + "test_calibration_file_it_cannot_use_is_refused_before_loading",
            _HQ + "test_non_regular_input_file_is_refused_without_hanging",
        ),
        "tiny",
        LAPTOP_QUANT,
    ),
    Failure(
        "#17 SIGINT ignored",
        "a step started under nohup inherited SIGINT ignored and never stopped gracefully",
        (
            _SIG + "test_signal_sensitive_tests_pass_with_sigint_ignored",
            _SIG + "test_popen_gives_the_child_sigint_at_its_default",
        ),
        "slow",
        LAPTOP_SLOW,
    ),
    Failure(
        "#17 orphans",
        "a killed step's own-session children (the vLLM server) outlived it and kept the GPUs",
        (
            _SIG + "test_a_killed_step_leaves_no_process_behind",
            _SIG + "test_kill_tree_takes_descendants_started_after_the_snapshot",
            "tests/serve/test_serve_run.py::test_an_interrupted_serve_step_stops_its_server",
        ),
        "slow",
        LAPTOP_SLOW,
    ),
)


# (pattern over one line of a note, id template): each way the notes record a failure. A failure is the
# first line that matches, per id; the committed list keeps that line so a reviewer can see the source.
EXTRACTION_RULES: tuple[tuple[str, str], ...] = (
    (r"^\| (\d+) \| May ", "Run {}"),  # the quantization run history tables
    (r"^\| S(\d+) \| ", "S{}"),  # the serving run history table (S1-S10)
    (r"\bS(\d+(?:\.\d+)?)(?: — |→| fixes applied)", "S{}"),  # the serving session notes (S11-S15, S13.5)
    (r"^\| (\d+) \| [a-z_.]+ \|\s*$", "Config {}"),  # the post-export config.json patches table
    (r"--low_memory_mode", "low_memory_mode"),
    (r"calib_size=256", "calib_size=256"),
    (r"kernels ?package for FP8 ops", "kernels package"),
    (r"assert torch\.all\(activation_scaling_factor > 0\)", "activation-scale assert"),
    (r"w1_weight_scale_2 must match w3_weight_scale_2", "w1/w3 weight_scale_2"),
)


def extract_seed_failures(notes: Path = SEED_NOTES) -> list[dict[str, str]]:
    """Every failure the notes record: [{id, note, line}] in order of first appearance (notes sorted by
    name, lines in order, rules in order), ``line`` the stripped line that records it (up to 160 chars)."""
    found: dict[str, dict[str, str]] = {}
    for note in sorted(notes.glob("*.txt")):
        for line in note.read_text(encoding="utf-8").splitlines():
            for pattern, template in EXTRACTION_RULES:
                for match in re.finditer(pattern, line):
                    fid = template.format(*match.groups())
                    found.setdefault(fid, {"id": fid, "note": note.name, "line": line.strip()[:160]})
    return list(found.values())


def recorded_seed_failures(path: Path = SEED_FAILURES_FILE) -> list[dict[str, str]]:
    return json.loads(path.read_text(encoding="utf-8"))


SEED_FAILURES: tuple[str, ...] = tuple(f["id"] for f in recorded_seed_failures())


def _display_order(failure: Failure) -> tuple[int, float]:
    """Runs, then serving attempts, then the rest, each in the order the notes record them."""
    kind = 0 if failure.id.startswith("Run ") else 1 if re.fullmatch(r"S[\d.]+", failure.id) else 2
    number = re.search(r"[\d.]+", failure.id)
    return kind, float(number[0]) if kind < 2 and number else SEED_FAILURES.index(failure.id)


def markdown() -> str:
    """docs/failures.md."""
    lines = [
        "# Failure catalogue",
        "",
        "Every failure the seed notes record (Run N, SN, Config N: the README defines these under",
        "[Terms](../README.md#terms); and the other failures of their bug lists) → the tests that catch it",
        "→ the tier that runs them → when they fire. Generated from `harness/failures.py`; the list of failures",
        "is `fixtures/seed_failures.json`, extracted from the notes by `harness.failures.EXTRACTION_RULES`",
        "(each entry quotes the line that records it). `tests/harness/test_failures.py` re-extracts it from",
        "`../shared/seeds` when present, and checks that every failure has a row, every row names tests,",
        "every named test exists, and that this file equals the table. Regenerate:",
        "",
        "```",
        "python -c 'from harness.failures import markdown; print(markdown(), end=\"\")' > docs/failures.md",
        "```",
        "",
        "| failure | what happened | caught by | tier | fires |",
        "|---|---|---|---|---|",
    ]
    for f in sorted(CATALOGUE, key=_display_order):
        lines.append(_row(f))
    lines += [
        "",
        "## Found by the project's own reviews",
        "",
        "Bugs the hostile-input review (issue 13) and the signal review (issue 17) found in this project:",
        "each row names the tests that fail when that bug is put back (`harness.failures.FINDINGS`).",
        "",
        "| finding | what happened | caught by | tier | fires |",
        "|---|---|---|---|---|",
        *(_row(f) for f in FINDINGS),
    ]
    return "\n".join(lines) + "\n"


def _row(f: Failure) -> str:
    tests = "<br>".join(f"`{t}`" for t in f.tests)
    return f"| {f.id} | {f.what} | {tests} | {f.tier} | {f.fires} |"
