"""`dsv4 serve`: the vLLM server command for a converted checkpoint, its refusals, and the smoke run.

The command is built from tables, each row with its reason and the vLLM source it rests on; they also
generate docs/serve.md's tables. One concern a module, each importing only those listed before it:

* ``settings``: the defaults and ``ServeSettings``, what everything else is built from.
* ``flags``: ``FLAGS``, every flag we emit, and the ``vllm serve`` argv built from them.
* ``backends``: ``MOE_BACKENDS``, every ``--moe-backend`` value and why NVFP4 experts can or cannot use it.
* ``spellings``: how vLLM spells the settings we set or refuse, and which of them a pass-through argv sets.
* ``refusals``: ``REFUSALS``, and every reason the flags would not work.
* ``checks``: ``CONFIG_CHECKS`` and ``CHECKPOINT_CHECKS``, what the checkpoint must be.
* ``preflight``: all of the above in order, before any GPU time.
* ``gpu``: the default tensor parallel size from the GPUs visible here.
* ``compose``: the docker compose file (JSON, which is YAML).
* ``client``: the server's URL and proxy-free HTTP to it.
* ``process``: starting and stopping the server, its log.
* ``health``: waiting for ``GET /health``.
* ``smoke``: one greedy completion and its tokens/s.
* ``docs``: the tables as markdown.

None of them imports torch at import time (`dsv4 serve --help` reads the tables): ``checks`` and
``preflight`` import the checkpoint reader when they run.

This module re-exports their public names: ``from pipeline import serve as S; S.preflight(...)``.
"""

from pipeline.serve.backends import MOE_BACKENDS, MOE_BY_NAME, MoeBackend, moe_backends, normalize_backend
from pipeline.serve.checks import (
    CHECKPOINT_CHECKS,
    CONFIG_CHECKS,
    TOKENIZER_FILES,
    Check,
    CheckContext,
    _target_layout,
    tokenizer_dir,
)
from pipeline.serve.client import base_url, client_host, get_status
from pipeline.serve.client import get_status as _get
from pipeline.serve.compose import (
    CONTAINER_ROOT,
    DEFAULT_SHM_SIZE,
    IMAGES,
    compose_spec,
    health_probe,
    in_container,
    to_yaml,
)
from pipeline.serve.docs import tables_markdown
from pipeline.serve.flags import FLAG_BY_DEST, FLAGS, Flag, render, server_command, vllm_args
from pipeline.serve.gpu import default_tensor_parallel_size, visible_gpus
from pipeline.serve.health import wait_for_health
from pipeline.serve.preflight import preflight
from pipeline.serve.process import log_tail, start_server, stop_server
from pipeline.serve.refusals import REFUSALS, Refusal, refusals
from pipeline.serve.settings import (
    CONTAINER_HOST,
    DEFAULT_HEALTH_TIMEOUT,
    DEFAULT_MAX_MODEL_LEN,
    DEFAULT_MOE_BACKEND,
    DEFAULT_PORT,
    KV_CACHE_DTYPE,
    LOCAL_HOST,
    NODE_GPUS,
    STEP,
    ServeSettings,
)
from pipeline.serve.smoke import (
    SMOKE_MAX_TOKENS,
    SMOKE_PROMPT,
    SmokeResult,
    parse_completion,
    smoke_body,
    smoke_request,
    tokens_per_second,
)
from pipeline.serve.spellings import CONTAINER_SPELLINGS, NESTED, SPELLINGS, settings_in

__all__ = [
    "CHECKPOINT_CHECKS",
    "CONFIG_CHECKS",
    "CONTAINER_HOST",
    "CONTAINER_ROOT",
    "CONTAINER_SPELLINGS",
    "DEFAULT_HEALTH_TIMEOUT",
    "DEFAULT_MAX_MODEL_LEN",
    "DEFAULT_MOE_BACKEND",
    "DEFAULT_PORT",
    "DEFAULT_SHM_SIZE",
    "FLAGS",
    "FLAG_BY_DEST",
    "IMAGES",
    "KV_CACHE_DTYPE",
    "LOCAL_HOST",
    "MOE_BACKENDS",
    "MOE_BY_NAME",
    "NESTED",
    "NODE_GPUS",
    "REFUSALS",
    "SMOKE_MAX_TOKENS",
    "SMOKE_PROMPT",
    "SPELLINGS",
    "STEP",
    "TOKENIZER_FILES",
    "Check",
    "CheckContext",
    "Flag",
    "MoeBackend",
    "Refusal",
    "ServeSettings",
    "SmokeResult",
    "_get",
    "_target_layout",
    "base_url",
    "client_host",
    "compose_spec",
    "default_tensor_parallel_size",
    "get_status",
    "health_probe",
    "in_container",
    "log_tail",
    "moe_backends",
    "normalize_backend",
    "parse_completion",
    "preflight",
    "refusals",
    "render",
    "server_command",
    "settings_in",
    "smoke_body",
    "smoke_request",
    "start_server",
    "stop_server",
    "tables_markdown",
    "to_yaml",
    "tokenizer_dir",
    "tokens_per_second",
    "visible_gpus",
    "vllm_args",
    "wait_for_health",
]
