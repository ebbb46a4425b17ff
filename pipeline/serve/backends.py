"""Every value of vLLM's ``--moe-backend`` (``MoEBackend`` in vllm/config/kernel.py), which NVFP4 MoE
kernel it maps to, whether it applies V4's SwiGLU clamp, and why dsv4 serve refuses it if it does.

Routed experts of the mixed layout get ``ModelOptNvFp4FusedMoE`` (vllm/models/deepseek_v4/quant_config.py
``DeepseekV4FP8Config.get_quant_method``), whose kernel is chosen by ``select_nvfp4_moe_backend``
(vllm/model_executor/layers/fused_moe/oracle/nvfp4.py): the user's ``moe_backend`` goes through
``map_nvfp4_backend`` (any other value raises ValueError), and with ``swiglu_limit`` set (V4 Pro: 10.0)
only backends in its ``NVFP4_BACKENDS_WITH_CLAMP`` are accepted. ``moe_backend`` comes from
``--moe-backend`` or ``--kernel-config '{"moe_backend": ..}'`` (vllm/engine/arg_utils.py
``EngineArgs.add_cli_args`` / ``create_engine_config`` copy it into ``KernelConfig.moe_backend``); no
environment variable selects the NVFP4 MoE kernel in 0.32. ``deep_gemm_mega_moe`` never reaches that
oracle: ``DeepseekV4MoE`` (vllm/models/deepseek_v4/nvidia/model.py) builds ``DeepseekV4MegaMoEExperts``
instead, whose scale parameters have one column per 32 inputs (MXFP4), so loading NVFP4 scales (one per
16) fails (the seeds' S6).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.vllm_config.targets import VLLM_TARGETS

_NOT_NVFP4 = (
    "not an NVFP4 MoE backend: vLLM's map_nvfp4_backend raises ValueError ('not supported for NvFP4 "
    "MoE') when the model is built"
)


@dataclass(frozen=True)
class MoeBackend:
    name: str  # the --moe-backend value (vLLM's MoEBackend literal)
    nvfp4: str | None  # the NvFp4MoeBackend it maps to; None: map_nvfp4_backend rejects it
    clamp: bool  # applies the SwiGLU clamp (in NVFP4_BACKENDS_WITH_CLAMP)
    note: str
    refused: str | None = None  # why dsv4 serve refuses it; None: allowed
    versions: tuple[str, ...] = VLLM_TARGETS  # the vLLM targets whose MoEBackend has it

    @property
    def allowed(self) -> bool:
        return self.refused is None


# Every value of MoEBackend (vllm/config/kernel.py) in any target, in vLLM's order (0.32's, and 0.33's
# additions after the row they follow there); a row's versions say which targets have it. nvfp4/clamp are
# map_nvfp4_backend and NVFP4_BACKENDS_WITH_CLAMP (oracle/nvfp4.py); the vllm tier checks them.
MOE_BACKENDS: tuple[MoeBackend, ...] = (
    MoeBackend(
        "auto",
        None,
        True,
        "vLLM tries FLASHINFER_TRTLLM, FLASHINFER_CUTEDSL, FLASHINFER_CUTLASS, VLLM_CUTLASS, MARLIN, "
        "HUMMING, EMULATION in turn (clamping ones only) and takes the first that runs here: it may fall "
        "back to a weight-only or emulated kernel without an error",
    ),
    MoeBackend("triton", None, False, "unquantized/FP8/INT Triton kernels", _NOT_NVFP4),
    MoeBackend("batched_triton", None, False, "batched Triton experts", _NOT_NVFP4),
    MoeBackend("deep_gemm", None, False, "DeepGEMM, FP8 block experts only", _NOT_NVFP4),
    MoeBackend(
        "deep_gemm_mega_moe",
        None,
        False,
        "DeepGEMM MegaMoE, V4's native MXFP4 path",
        "V4's MoE layer then builds MegaMoE experts instead of fused MoE (DeepseekV4MoE, "
        "vllm/models/deepseek_v4/nvidia/model.py): DeepseekV4MegaMoEExperts in vLLM 0.32, "
        "DeepGemmMegaMoEExperts with its MEGA_MOE_MXFP4 format in 0.33, an MXFP4 kernel either way: its "
        "w13/w2_weight_scale parameters hold one UE8M0 scale per 32 inputs and it has no weight_scale_2 "
        "or input_scale, so NVFP4 experts (one e4m3 scale per 16 inputs) stop the load with "
        "'w2_weight_scale (7168, 96) vs (7168, 192)' (seeds S6). 0.32 has no NVFP4 MegaMoE kernel; 0.33 "
        "has an NVFP4 mega-MoE format, which V4's MoE layer does not use.",
    ),
    MoeBackend("cutlass", "VLLM_CUTLASS", True, "vLLM's CUTLASS FP4 grouped GEMM"),
    MoeBackend(
        "flashinfer_trtllm",
        "FLASHINFER_TRTLLM",
        True,
        "FlashInfer TRT-LLM-gen FP4 MoE, Blackwell (SM100) only; vLLM's first automatic choice",
    ),
    MoeBackend("flashinfer_cutlass", "FLASHINFER_CUTLASS", True, "FlashInfer CUTLASS FP4 MoE"),
    MoeBackend(
        "flashinfer_cutedsl",
        "FLASHINFER_CUTEDSL",
        True,
        "FlashInfer CuTe-DSL FP4 MoE; with a batched (expert-parallel all2all) activation format vLLM "
        "switches to FLASHINFER_CUTEDSL_BATCHED, which has no clamp and is refused by vLLM for V4",
    ),
    MoeBackend(
        "flashinfer_moe_ep_cutedsl",
        "FLASHINFER_MOE_EP_CUTEDSL",
        True,
        "FlashInfer MoE-EP mega-kernel with NVFP4 weights: needs --enable-expert-parallel and NVSHMEM",
    ),
    MoeBackend(
        "flashinfer_b12x",
        "FLASHINFER_B12X",
        False,
        "FlashInfer CuTe-DSL MoE for SM12x",
        "it does not apply the SwiGLU clamp and V4 sets swiglu_limit (10.0): select_nvfp4_moe_backend "
        "raises ValueError for an explicitly requested backend outside NVFP4_BACKENDS_WITH_CLAMP",
    ),
    MoeBackend("b12x", "B12X", True, "b12x FP4 MoE kernels, SM12x (RTX Pro 6000 / DGX Spark) only"),
    MoeBackend(
        "flashinfer_moe_ep_mega_deep_gemm",
        None,
        False,
        "FlashInfer MoE-EP with the DeepGEMM megakernel",
        "it consumes an MXFP4 checkpoint verbatim (KernelConfig.moe_backend's documentation, "
        "vllm/config/kernel.py) and map_nvfp4_backend rejects it: the release serves with it, an NVFP4 "
        "conversion cannot",
    ),
    MoeBackend(
        "marlin",
        "MARLIN",
        True,
        "weight-only FP4 (activations stay BF16, the calibrated input_scale is unused): runs, but is not "
        "the W4A4 model that was calibrated",
    ),
    MoeBackend("humming", "HUMMING", True, "Humming mixed-precision kernels"),
    MoeBackend("triton_unfused", None, False, "unfused Triton MoE", _NOT_NVFP4),
    MoeBackend("aiter", None, False, "AMD AITER (ROCm)", _NOT_NVFP4),
    MoeBackend("aiter_mega_moe", None, False, "AMD AITER MegaMoE (ROCm, MXFP4)", _NOT_NVFP4),
    MoeBackend("aiter_triton_mxfp4_bf16", None, False, "AMD AITER Triton MXFP4 W4A16 (ROCm)", _NOT_NVFP4),
    MoeBackend(
        "aiter_triton_mxfp4_mxfp4",
        None,
        False,
        "AMD AITER Triton MXFP4 W4A4 (ROCm); new in vLLM 0.33",
        _NOT_NVFP4,
        ("0.33",),
    ),
    MoeBackend("flydsl", None, False, "AMD FlyDSL (ROCm)", _NOT_NVFP4),
    MoeBackend("hpc", None, False, "HPC kernels, FP8 on Hopper only", _NOT_NVFP4),
    MoeBackend(
        "emulation",
        "EMULATION",
        True,
        "dequantizes to BF16 and emulates FP4 activations: correct but far too slow to serve; for tests",
    ),
    MoeBackend("rdna3", None, False, "RDNA3 W4A16 HIP kernel (ROCm gfx1100)", _NOT_NVFP4),
)
MOE_BY_NAME = {b.name: b for b in MOE_BACKENDS}


def moe_backends(target: str) -> tuple[MoeBackend, ...]:
    """The rows of MOE_BACKENDS that vLLM ``target``'s MoEBackend has, in its order."""
    return tuple(b for b in MOE_BACKENDS if target in b.versions)


def normalize_backend(value: str) -> str:
    """vLLM's normalisation of a backend name (KernelConfig._normalize_moe_backend)."""
    return value.lower().replace("-", "_")
