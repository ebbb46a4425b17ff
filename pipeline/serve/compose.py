"""The docker compose file: one service on the official vLLM image running `vllm serve` with our flags,
the checkpoint mounted read-only, the GPUs reserved, a health check on /health. Written as JSON, which is
YAML, so no YAML emitter is needed."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from pipeline.serve.flags import vllm_args
from pipeline.serve.settings import CONTAINER_HOST, DEFAULT_HEALTH_TIMEOUT, ServeSettings

CONTAINER_ROOT = "/models"
DEFAULT_SHM_SIZE = "64gb"
IMAGES = {"0.32": "vllm/vllm-openai:v0.32.0", "0.33": "vllm/vllm-openai:v0.33.0"}


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


def to_yaml(obj: dict, header: str = "") -> str:
    """The compose file's text: ``header`` as YAML comments, then ``obj`` as indented JSON (JSON is YAML:
    docker compose and PyYAML read it back as ``obj``). Non-ASCII stays UTF-8: PyYAML reads the escaped
    surrogate pair of a character outside the BMP as two characters."""
    comments = [f"# {line}".rstrip() for line in header.splitlines()]
    return "\n".join([*comments, json.dumps(obj, indent=2, ensure_ascii=False)]) + "\n"
