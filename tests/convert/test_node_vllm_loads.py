"""Every converted checkpoint kind through the node's vLLM (the CUDA wheel, DSV4_VLLM_VERSION, default
0.33.0), on a CPU: its own DeepSeek V4 model, built for an SM100 (B200) and an SM90 (H200) GPU, and its
own DefaultModelLoader.load_weights (harness/vllm_node.py says how, and what stands in for the GPU).

Cases: kind (experts: ModelOpt experts recipe; transcode: --experts transcode; full: ModelOpt full
recipe; all with --graft-from) x `--target-vllm` (0.32, 0.33) x GPU, on the vllm-shaped tiny model
(the micro preset's head_dim 64 is refused by vLLM's attention-cache check, in 0.32 as in 0.33).

Verified: vLLM loads it (its strict tracking passes; every byte of every parameter is written), every
parameter holds the checkpoint's bytes (fused ones: the parts in the order below), every checkpoint
tensor but the MTP block (the draft model's) lands in a parameter, and the quantization config and
per-module methods vLLM picks (snapshotted). Not verified: any kernel (nothing runs), and what vLLM does
after loading (process_weights_after_loading, which converts weights for the kernels).
"""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file
from syrupy.extensions.json import JSONSnapshotExtension

from harness import vllm_node
from pipeline.checkpoint import Checkpoint
from pipeline.vllm_config import VLLM_TARGETS
from tests.convert.conftest import case_name

pytestmark = pytest.mark.vllm_node

CASES = [
    pytest.param(gpu, kind, target, id=f"{gpu}-{kind}-{target}")
    for gpu in vllm_node.CAPABILITIES
    for kind in vllm_node.KINDS
    for target in VLLM_TARGETS
]

# ---- where each vLLM parameter comes from, read in vLLM's V4 model code (nvidia/model.py, attention.py,
# compressor.py) and its fused MoE loader; written out here so that the expectation is not vLLM's own

# top-level native names -> vLLM's
TOP_LEVEL = {"embed.weight": "model.embed_tokens.weight", "head.weight": "lm_head.weight"}
# vLLM modules holding several native modules, their rows concatenated (dim 0) in this order
FUSED = {
    "attn.fused_wqa_wkv": ("attn.wq_a", "attn.wkv"),
    "attn.compressor.fused_wkv_wgate": ("attn.compressor.wkv", "attn.compressor.wgate"),
    "attn.indexer.compressor.fused_wkv_wgate": (
        "attn.indexer.compressor.wkv",
        "attn.indexer.compressor.wgate",
    ),
    "ffn.shared_experts.gate_up_proj": ("ffn.shared_experts.w1", "ffn.shared_experts.w3"),
    "ffn.shared_experts.down_proj": ("ffn.shared_experts.w2",),
}
FP8_SCALE = (".scale", ".weight_scale_inv")  # native FP8 tile scale -> vLLM's name for it
# native names vLLM keeps under another last part (checked on the whole name's end)
RENAMED_ENDINGS = {".scale": ".weight_scale_inv", ".ffn.gate.bias": ".ffn.gate.e_score_correction_bias"}
ROUTED = "ffn.experts.routed_experts."
# routed experts: vLLM parameter -> native projections and the suffix they are read from; one slot per
# expert, each expert's projections concatenated (tensors) or side by side (0-d scales)
ROUTED_PARAMS = {
    "w13_weight": (("w1", "w3"), "weight"),
    "w13_weight_scale": (("w1", "w3"), "weight_scale"),
    "w13_weight_scale_2": (("w1", "w3"), "weight_scale_2"),
    "w13_input_scale": (("w1", "w3"), "input_scale"),
    "w2_weight": (("w2",), "weight"),
    "w2_weight_scale": (("w2",), "weight_scale"),
    "w2_weight_scale_2": (("w2",), "weight_scale_2"),
    "w2_input_scale": (("w2",), "input_scale"),
}
# the only departures from "same dtype, same shape": vLLM pads the attention sink to its kernels' head
# count (the checkpoint fills the first rows) and keeps the hash-routing table as int32
PADDED = ("attn.attn_sink",)
CAST = ("ffn.gate.tid2eid",)


def _routed(ckpt: dict[str, torch.Tensor], layer: str, experts: int) -> dict[str, tuple]:
    out = {}
    for param, (projections, suffix) in ROUTED_PARAMS.items():
        keys, slots = [], []
        for e in range(experts):
            parts = [f"{layer}.ffn.experts.{e}.{p}.{suffix}" for p in projections]
            keys += parts
            values = [ckpt[k] for k in parts]
            slots.append(torch.cat(values) if values[0].dim() else torch.stack(values).squeeze(0))
        out[f"model.{layer}.{ROUTED}{param}"] = (torch.stack(slots), keys)
    return out


def _fused(ckpt: dict[str, torch.Tensor], layer: str) -> dict[str, tuple]:
    out = {}
    for module, parts in FUSED.items():
        for native_suffix, vllm_suffix in ((".weight", ".weight"), FP8_SCALE):
            keys = [f"{layer}.{p}{native_suffix}" for p in parts]
            if all(k in ckpt for k in keys):
                out[f"model.{layer}.{module}{vllm_suffix}"] = (torch.cat([ckpt[k] for k in keys]), keys)
    return out


def expected_parameters(ckpt: dict[str, torch.Tensor], config: dict) -> dict[str, tuple]:
    """{vLLM parameter: (its value built from the checkpoint, the checkpoint keys it is made of)}."""
    out: dict[str, tuple] = {}
    layers = sorted({m[1] for k in ckpt if (m := re.match(r"(layers\.\d+)\.", k))})
    for layer in layers:
        out |= _routed(ckpt, layer, config["n_routed_experts"])
        out |= _fused(ckpt, layer)
    used = {k for _, keys in out.values() for k in keys}
    for key, value in ckpt.items():
        if key in used or key.startswith("mtp."):
            continue  # the main model drops the MTP block: vLLM's draft model loads it
        name = TOP_LEVEL.get(key) or "model." + key
        for ending, vllm_ending in RENAMED_ENDINGS.items():
            if name.endswith(ending):
                name = name.removesuffix(ending) + vllm_ending
        out[name] = (value, [key])
    return out


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


@pytest.fixture(scope="module")
def loaded(node_checkpoints, node_reports):
    """(gpu, kind, target) -> (report, vLLM's loaded parameters, expected parameters)."""
    cache: dict[tuple, tuple] = {}

    def get(gpu: str, kind: str, target: str):
        key = (gpu, kind, target)
        if key not in cache:
            report = node_reports(gpu)["checkpoints"][case_name(kind, target)]
            ck = Checkpoint.open(node_checkpoints[kind, target])
            params = load_file(report["params"])
            cache[key] = (report, params, expected_parameters(dict(ck.iter_tensors()), ck.config))
        return cache[key]

    return get


@pytest.mark.parametrize(("gpu", "kind", "target"), CASES)
def test_vllms_loader_writes_every_byte_of_every_parameter(loaded, gpu, kind, target):
    """vLLM's strict tracking passed (the worker fails otherwise), and no byte kept the fill pattern: a
    missing expert would leave its slot of a fused parameter untouched, which vLLM's tracking misses."""
    report, params, _ = loaded(gpu, kind, target)
    assert params, "vLLM built no parameters"
    assert report["unwritten"] == {}


@pytest.mark.parametrize(("gpu", "kind", "target"), CASES)
def test_every_parameter_holds_the_checkpoints_bytes(loaded, gpu, kind, target):
    _, params, expected = loaded(gpu, kind, target)
    assert sorted(params) == sorted(expected)
    wrong = []
    for name, param in params.items():
        want, keys = expected[name]
        if name.endswith(CAST):
            ok = param.shape == want.shape and torch.equal(param.to(want.dtype), want)
        elif name.endswith(PADDED):
            ok = param.dtype == want.dtype and torch.equal(_bytes(param[: len(want)]), _bytes(want))
        else:
            ok = (param.dtype, param.shape) == (want.dtype, want.shape) and torch.equal(
                _bytes(param), _bytes(want)
            )
        if not ok:
            wrong.append(
                f"{name} {param.dtype} {tuple(param.shape)} <- {keys[:2]} {want.dtype} {tuple(want.shape)}"
            )
    assert wrong == []


@pytest.mark.parametrize(("kind", "target"), [(k, t) for k in vllm_node.KINDS for t in VLLM_TARGETS])
def test_every_checkpoint_tensor_but_mtp_lands_in_a_parameter(loaded, node_checkpoints, kind, target):
    _, _, expected = loaded("sm100", kind, target)
    ckpt_keys = set(Checkpoint.open(node_checkpoints[kind, target]).tensors)
    used = [k for _, keys in expected.values() for k in keys]
    assert len(used) == len(set(used)), "a checkpoint tensor feeds two parameters"
    assert set(used) == {k for k in ckpt_keys if not k.startswith("mtp.")}
    assert any(k.startswith("mtp.") for k in ckpt_keys)  # grafted: present, and left to the draft model


@pytest.fixture
def json_snapshot(snapshot):
    return snapshot.use_extension(JSONSnapshotExtension)


@pytest.mark.parametrize(("gpu", "kind", "target"), CASES)
def test_the_methods_vllm_picks(node_reports, gpu, kind, target, json_snapshot):
    """The quantization config and each module's method, FP8 kernel and NVFP4 MoE backend, as vLLM chose
    them at build time for this GPU (chosen, not run). A vLLM release that changes a choice shows here
    as a snapshot diff; review it, then `tox -e vllm-node -- --snapshot-update`."""
    whole = node_reports(gpu)
    report = whole["checkpoints"][case_name(kind, target)]
    assert whole["capability"] == list(vllm_node.CAPABILITIES[gpu])
    assert whole["cuda_available"] is False  # torch saw no GPU: nothing could have run on one
    assert report["quant_config"].endswith(".DeepseekV4FP8Config")
    experts = {m: d for m, d in report["methods"].items() if m.endswith("routed_experts")}
    assert experts and all(d.startswith("ModelOptNvFp4FusedMoE") for d in experts.values()), experts
    snapshot = {k: report[k] for k in ("quantization", "quant_config", "methods")}
    assert {"vllm": whole["vllm"], **snapshot} == json_snapshot
