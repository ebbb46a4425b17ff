"""Where a step computes: the GPU when there is one (or when asked), else the CPU."""

from __future__ import annotations

import torch

from pipeline.errors import DsV4Error


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA if torch sees one, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; an error naming the
    option when CUDA is asked for and absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DsV4Error(f"--device {name}: torch sees no CUDA device")
    return torch.device(name)
