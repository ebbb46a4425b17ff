"""The smoke request: one greedy ``POST /v1/completions``, and tokens/s from the response's
``usage.completion_tokens`` over the request's wall time."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.errors import DsV4Error
from pipeline.serve.client import OPENER

SMOKE_PROMPT = "The capital of France is"
SMOKE_MAX_TOKENS = 32


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
        with OPENER.open(request, timeout=timeout) as resp:
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
