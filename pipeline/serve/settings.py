"""`dsv4 serve`'s defaults and the resolved settings every other module of the package builds from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.vllm_config.targets import DEFAULT_TARGET

STEP = "dsv4 serve"
NODE_GPUS = 8  # the 8xB200 node; the default tensor parallel size when no GPU is visible here
DEFAULT_PORT = 8000
DEFAULT_MAX_MODEL_LEN = 65536  # the release's original_max_position_embeddings (YaRN extends to 1M)
DEFAULT_MOE_BACKEND = "flashinfer_trtllm"
KV_CACHE_DTYPE = "fp8"
LOCAL_HOST = "127.0.0.1"
CONTAINER_HOST = "0.0.0.0"
DEFAULT_HEALTH_TIMEOUT = 1800.0  # the seeds' S15 took 330 s to load 880 GB; compile and graphs come after


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
