"""The default tensor parallel size: the GPUs this process sees, else the node's."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Mapping
from typing import Any

from pipeline.serve.settings import NODE_GPUS


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
