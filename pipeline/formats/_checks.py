"""Input validation shared by the format functions: errors that say what was expected."""

from __future__ import annotations

from collections.abc import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def require_dtype(t: torch.Tensor, allowed: Iterable[torch.dtype], what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(t).__name__}")
    allowed = tuple(allowed)
    if t.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise TypeError(f"{what}: expected dtype {names}; got {str(t.dtype).removeprefix('torch.')}")


def require_ndim(t: torch.Tensor, ndim: int, what: str, layout: str) -> None:
    if t.ndim != ndim:
        raise ValueError(f"{what}: expected a {ndim}-D tensor {layout}; got shape {tuple(t.shape)}")


def require_min_ndim(t: torch.Tensor, ndim: int, what: str) -> None:
    if t.ndim < ndim:
        raise ValueError(f"{what}: expected at least {ndim} dimension(s); got shape {tuple(t.shape)}")


def require_last_dim_multiple(t: torch.Tensor, multiple: int, what: str, why: str) -> None:
    if t.shape[-1] % multiple:
        raise ValueError(
            f"{what}: last dimension must be a multiple of {multiple} ({why}); got shape {tuple(t.shape)}"
        )


def require_shape(t: torch.Tensor, expected: tuple[int, ...], what: str, why: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{what}: expected shape {tuple(expected)} ({why}); got {tuple(t.shape)}")


def require_finite(t: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(t).all()):
        bad = (~torch.isfinite(t)).nonzero()[0].tolist()
        raise ValueError(f"{what}: expected finite values; first non-finite at index {bad}")


def require_finite_maxima(maxima: torch.Tensor, t: torch.Tensor, what: str) -> None:
    """require_finite(t) for a caller that has computed ``maxima`` (per-block |t| maxima) anyway: a NaN
    or inf in ``t`` makes its block's maximum non-finite (amax propagates NaN), so checking the few
    maxima stands in for a pass over every element; the full pass runs only to name the index."""
    if not bool(torch.isfinite(maxima).all()):
        require_finite(t, what)


def require_codes(codes: torch.Tensor, what: str) -> None:
    require_dtype(codes, (torch.uint8,), what)
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError(f"{what}: E2M1 codes are 4-bit (0..15); got a maximum of {int(codes.max())}")
