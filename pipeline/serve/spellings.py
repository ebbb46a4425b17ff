"""How `vllm serve` spells the settings dsv4 serve sets or refuses, and which of them a pass-through argv
sets: ``--x v``, ``--x=v``, ``--x_y v``, ``--container.key v`` and ``--container '{"key": v}'``."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

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


def shown(spelled: str, value: str | None) -> str:
    """A flag as the user wrote it: ``--x=v`` and JSON containers as they were, else ``--x v``."""
    if value is None or "=" in spelled:
        return spelled
    if _normal(spelled) in CONTAINER_SPELLINGS["kernel_config"]:
        return f"{spelled} {{moe_backend: {value}}}"
    return f"{spelled} {value}"
