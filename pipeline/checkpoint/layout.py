"""What kind of checkpoint this is (release FP8+MXFP4, BF16, NVFP4 export), and what role each tensor plays.

Steps call :func:`require_layout` before their long work so that a checkpoint of the wrong kind (the
user's Run 1: an FP8 checkpoint handed to a step that needs BF16) stops them at once with a message
that says what was found and what to do.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass

from pipeline.errors import DsV4Error

# FP8 block weights carry their scale as `.scale` (release) or `.weight_scale_inv` (HF dialect).
FP8_SCALE_SUFFIXES = (".scale", ".weight_scale_inv")
FLOAT_DTYPES = ("BF16", "F16", "F32")


class Layout(enum.Enum):
    RELEASE = "release-fp8-mxfp4"
    BF16 = "bf16"
    NVFP4 = "nvfp4-export"
    UNKNOWN = "unknown"

    @property
    def description(self) -> str:
        return _DESCRIPTIONS[self]


_DESCRIPTIONS = {
    Layout.RELEASE: "release FP8+MXFP4 (F8_E4M3 block weights and I8 MXFP4 experts with UE8M0 .scale)",
    Layout.BF16: "BF16 (unquantized weights, no scales)",
    Layout.NVFP4: "NVFP4 export (U8 weights with .weight_scale / .weight_scale_2)",
    Layout.UNKNOWN: "unrecognised (no 2-D .weight tensors)",
}

_HINTS = {
    (Layout.BF16, Layout.RELEASE): "dequantize the release checkpoint to BF16 first and pass that output",
    (Layout.BF16, Layout.NVFP4): "this is already a quantized export; pass the BF16 checkpoint it came from",
    (Layout.RELEASE, Layout.BF16): "pass the release checkpoint as published (FP8 attention, MXFP4 experts)",
    (Layout.RELEASE, Layout.NVFP4): "pass the release checkpoint as published, not an NVFP4 export",
    (Layout.NVFP4, Layout.RELEASE): "quantize the experts to NVFP4 first; this is the release checkpoint",
    (Layout.NVFP4, Layout.BF16): "quantize it to NVFP4 first; this is an unquantized BF16 checkpoint",
}


@dataclass(frozen=True)
class LayoutInfo:
    layout: Layout
    evidence: str  # one example key and why it decided


def classify_layout(tensors: Mapping[str, object]) -> LayoutInfo:
    """Classify from ``{key: obj with .dtype (safetensors string) and .shape}`` (headers suffice).

    NVFP4 if any U8 ``.weight`` has a ``.weight_scale`` sibling; release if any F8_E4M3 ``.weight``
    has a ``.scale`` (or ``.weight_scale_inv``) or any I8 ``.weight`` has a ``.scale``; BF16 if no
    weight is quantized and some 2-D ``.weight`` is a float.
    """
    fp8 = mxfp4 = float_w = None
    for key in sorted(tensors):
        if not key.endswith(".weight"):
            continue
        t = tensors[key]
        stem = key[: -len(".weight")]
        if t.dtype == "U8" and f"{key}_scale" in tensors:
            return LayoutInfo(Layout.NVFP4, f"{key} is U8 with {key}_scale")
        if fp8 is None and t.dtype == "F8_E4M3" and any(stem + s in tensors for s in FP8_SCALE_SUFFIXES):
            fp8 = f"{key} is F8_E4M3 with a block scale"
        elif mxfp4 is None and t.dtype == "I8" and f"{stem}.scale" in tensors:
            mxfp4 = f"{key} is I8 (MXFP4) with {stem}.scale"
        elif float_w is None and t.dtype in FLOAT_DTYPES and len(t.shape) >= 2:
            float_w = f"{key} is {t.dtype}"
    if fp8 or mxfp4:
        return LayoutInfo(Layout.RELEASE, fp8 or mxfp4)
    if float_w:
        return LayoutInfo(Layout.BF16, f"no quantized weights; e.g. {float_w}")
    return LayoutInfo(Layout.UNKNOWN, "no 2-D .weight tensors")


def layout_mismatch(found: LayoutInfo, expected: Layout, step: str = "this step") -> str | None:
    """The message for a checkpoint of the wrong kind, or None if it is the expected kind."""
    if found.layout is expected:
        return None
    hint = _HINTS.get((expected, found.layout), "")
    return (
        f"{step} needs a {expected.description} checkpoint, but this is {found.layout.description}: "
        f"{found.evidence}" + (f"; {hint}" if hint else "")
    )


def require_layout(path_or_tensors, expected: Layout, step: str = "this step") -> LayoutInfo:
    """Raise DsV4Error (naming the checkpoint) unless it has the ``expected`` layout."""
    from .reader import Checkpoint

    if isinstance(path_or_tensors, Mapping):
        where, tensors = "checkpoint", path_or_tensors
    else:
        ck = path_or_tensors if isinstance(path_or_tensors, Checkpoint) else Checkpoint.open(path_or_tensors)
        where, tensors = str(ck.root), ck.tensors
    found = classify_layout(tensors)
    msg = layout_mismatch(found, expected, step)
    if msg:
        raise DsV4Error(f"{where}: {msg}")
    return found


# Roles, first match wins: (role, pattern searched in the key with any `model.` prefix removed).
ROLES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (role, re.compile(pattern))
    for role, pattern in (
        ("mtp", r"^mtp\."),
        ("embed/head", r"^(embed|embed_tokens|head|lm_head)\."),
        ("hc", r"(^|\.)hc_"),
        ("indexer", r"\.indexer\."),
        ("compressor", r"\.compressor\."),
        ("routed experts", r"\.experts\."),
        ("shared experts", r"\.shared_experts\."),
        ("router", r"\.(ffn|mlp)\.gate\."),
        ("norms", r"(^|\.)[a-z_]*norm\.|layernorm\."),
        ("attention", r"\.(attn|self_attn)\."),
    )
)
OTHER_ROLE = "other"


def role_of(key: str) -> str:
    k = key.removeprefix("model.")
    for role, pattern in ROLES:
        if pattern.search(k):
            return role
    return OTHER_ROLE
