"""The target layout: every tensor of the converted checkpoint (the release layout with routed experts as
ModelOpt NVFP4), and the lookups the rules and actions make in it by role and by weight/scale suffix."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping as MappingABC
from dataclasses import dataclass
from typing import Any

from pipeline.release_layout import MXFP4, TensorSpec, release_weights

NVFP4 = "nvfp4"  # the target format of routed experts (ModelOpt NVFP4, 16-element blocks)
NVFP4_GROUP = 16
# ModelOpt NVFP4 siblings of X.weight, stored dtype and shape rule (checked on the real 0.47 export:
# weight_scale_2 and input_scale are 0-d float32).
NVFP4_SUFFIXES = (".weight", ".weight_scale", ".weight_scale_2", ".input_scale")


@dataclass(frozen=True)
class TargetTensor:
    key: str
    dtype: str
    shape: tuple[int, ...]
    fmt: str  # FP8, NVFP4 or PLAIN (release_layout's names)
    weight: str  # the logical weight it belongs to (release_layout's WeightSpec.name)


def _target_specs(weight: Any) -> list[TargetTensor]:
    if weight.fmt == MXFP4:
        rows, cols = weight.shape
        w = weight.name
        return [
            TargetTensor(f"{w}.weight", "U8", (rows, cols // 2), NVFP4, w),
            TargetTensor(f"{w}.weight_scale", "F8_E4M3", (rows, cols // NVFP4_GROUP), NVFP4, w),
            TargetTensor(f"{w}.weight_scale_2", "F32", (), NVFP4, w),
            TargetTensor(f"{w}.input_scale", "F32", (), NVFP4, w),
        ]
    return [TargetTensor(t.key, t.dtype, t.shape, weight.fmt, weight.name) for t in weight.tensors()]


def target_layout(config: MappingABC) -> dict[str, TargetTensor]:
    """Every tensor of the converted checkpoint: the release layout of ``config`` with each MXFP4 routed
    expert as ModelOpt NVFP4 (BRIEF §4: the layout NVIDIA publishes as DeepSeek-V4-Pro-NVFP4)."""
    return {t.key: t for w in release_weights(config) for t in _target_specs(w)}


def target_tensors(config: MappingABC) -> list[TensorSpec]:
    """:func:`target_layout` as release_layout TensorSpecs, in the release's order."""
    return [TensorSpec(t.key, t.dtype, t.shape) for t in target_layout(config).values()]


# Which blocks exist is all that decides a role's format; the sizes of this probe are irrelevant. One
# layer of each kind (hash-routed HCA, CSA with indexer, sliding) plus one MTP block.
_ROLE_PROBE_CONFIG: dict[str, Any] = {
    "hidden_size": 256,
    "vocab_size": 8,
    "hc_mult": 1,
    "num_attention_heads": 1,
    "head_dim": 32,
    "q_lora_rank": 32,
    "o_groups": 1,
    "o_lora_rank": 32,
    "n_routed_experts": 1,
    "moe_intermediate_size": 32,
    "n_shared_experts": 1,
    "num_experts_per_tok": 1,
    "index_n_heads": 1,
    "index_head_dim": 32,
    "num_hidden_layers": 3,
    "num_hash_layers": 1,
    "num_nextn_predict_layers": 1,
    "compress_ratios": [128, 4, 0, 0],
}
_DIGITS = re.compile(r"(?<=\.)\d+(?=\.)")


def _role(key: str) -> str:
    """A key with its layer/expert/MTP indices replaced by '#': its role."""
    return _DIGITS.sub("#", key)


@functools.cache
def _role_layout() -> dict[str, TargetTensor]:
    return {_role(k): t for k, t in target_layout(_ROLE_PROBE_CONFIG).items()}


def _target_of(target: str) -> TargetTensor | None:
    """The target-layout entry of a native key or of a sibling (NVFP4 / .scale) of a target weight."""
    roles = _role_layout()
    hit = roles.get(_role(target))
    if hit is not None:
        return hit
    for suffix in (".weight_scale_2", ".weight_scale", ".input_scale", ".scale"):
        if target.endswith(suffix):
            return roles.get(_role(target[: -len(suffix)] + ".weight"))
    return None


def _base(key: str) -> str:
    """A tensor key without its weight/scale suffix (bare parameters come back unchanged)."""
    for suffix in (".weight_scale_2", ".weight_scale", ".input_scale", ".scale", ".weight"):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return key
