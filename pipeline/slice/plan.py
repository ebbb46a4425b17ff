"""The plan of `dsv4 slice`, from headers (and the hash layers' small tid2eid tables): every output
tensor of the sliced config's release layout, where it comes from and what is done to it (copied, its
first E rows kept, or remapped), and the one function that produces it."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.checkpoint import (
    CONFIG_NAME,
    Checkpoint,
    OutputPlan,
    PlannedTensor,
    TensorInfo,
    plan_shards,
    read_tensor,
)
from pipeline.checkpoint.folder import files_to_copy
from pipeline.checkpoint.validate import check_read_values
from pipeline.errors import DsV4Error, one_line
from pipeline.provenance import code_digest
from pipeline.release_layout import ROUTED_EXPERT, release_tensors
from pipeline.step_options import DEFAULT_SHARD_BYTES

from .selection import (
    DEFAULT_EXPERTS,
    DEFAULT_LAYERS,
    REPORT_NAME,
    STEP,
    layer_kinds,
    select_layers,
    sliced_config,
)

_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(.+)$")
_GATE_ROWS = "ffn.gate.weight"
_GATE_BIAS = "ffn.gate.bias"
_TID2EID = "ffn.gate.tid2eid"


def remap_tid2eid(ids: torch.Tensor, experts: int) -> torch.Tensor:
    """Hash routing table [vocab, top_k] with every id below ``experts`` and each row's ids distinct.

    An id below ``experts`` that occurs first in its row stays; every other id becomes the first expert,
    counting up from ``id mod experts`` (wrapping), that the row does not hold yet. Needs top_k <= experts.
    """
    if ids.dim() != 2:
        raise DsV4Error(f"tid2eid must be [vocab, top_k]; got shape {tuple(ids.shape)}")
    vocab, top_k = ids.shape
    if top_k > experts:
        raise DsV4Error(f"tid2eid routes each token to {top_k} experts; cannot fit them into {experts}")
    ids = ids.to(torch.int64)
    out = ids.clone()
    rows = torch.arange(vocab)
    taken = torch.zeros((vocab, experts), dtype=torch.bool)
    kept = torch.zeros((vocab, top_k), dtype=torch.bool)
    for j in range(top_k):
        col = ids[:, j]
        ok = (col >= 0) & (col < experts)
        ok &= ~taken[rows, col.clamp(0, experts - 1)]
        taken[rows[ok], col[ok]] = True
        kept[:, j] = ok
    for j in range(top_k):
        r = rows[~kept[:, j]]
        c = torch.remainder(ids[r, j], experts)
        for _ in range(experts):
            if not r.numel():
                break
            free = ~taken[r, c]
            out[r[free], j] = c[free]
            taken[r[free], c[free]] = True
            r, c = r[~free], torch.remainder(c[~free] + 1, experts)
        if r.numel():  # pragma: no cover - top_k <= experts leaves a free expert in every row
            raise AssertionError("tid2eid remap: a row found no free expert")
    return out


@dataclass(frozen=True)
class Source:
    """Where an output tensor comes from, and what is done to it (copy, rows, remap)."""

    info: TensorInfo
    action: str  # "copy" (byte for byte), "rows" (first E rows / entries), "remap" (tid2eid)


@dataclass
class SlicePlan:
    source: Path
    source_config: dict
    layers: tuple[int, ...]
    experts: int
    config: dict
    output: OutputPlan
    sources: dict[str, Source]
    remapped: dict[str, torch.Tensor]  # tid2eid key -> the remapped table (small: vocab x top_k int64)
    rerouted: dict[str, int]  # tid2eid key -> tokens whose experts changed
    extra_files: list[Path] = field(default_factory=list)

    @property
    def read_bytes(self) -> int:
        return sum(s.info.nbytes for s in self.sources.values())

    def report(self) -> dict:
        src_cfg = self.source_config
        vocab = int(self.config["vocab_size"])
        return {
            "step": STEP,
            "code": code_digest(),
            "source": str(self.source),
            "layers": {f"layers.{new}": f"layers.{old}" for new, old in enumerate(self.layers)},
            "layer_kinds": {
                f"layers.{new}": sorted(layer_kinds(src_cfg, old)) for new, old in enumerate(self.layers)
            },
            "experts": f"the first {self.experts} of {src_cfg['n_routed_experts']} in every layer and MTP block",
            "tid2eid_rule": (
                "an id < E that occurs first in its row is kept; every other id becomes the first expert "
                "counting up from id mod E (wrapping) that the row does not hold yet: ids < E, distinct per row"
            ),
            "tokens_rerouted": {k: f"{n} of {vocab}" for k, n in self.rerouted.items()},
            "tensors": len(self.output.weight_map),
            "bytes": self.output.total_bytes,
        }


def _source_key(key: str, layers: Sequence[int]) -> str:
    m = _LAYER_KEY.match(key)
    return f"layers.{layers[int(m[1])]}.{m[2]}" if m else key


def _expected_dropped(key: str, layers: Sequence[int], experts: int, total: int) -> bool:
    """A source key the slice leaves out on purpose: an unkept layer, or a routed expert >= E."""
    m = _LAYER_KEY.match(key)
    if m and int(m[1]) not in layers and int(m[1]) < total:
        return True
    for suffix in (".weight", ".scale"):
        if key.endswith(suffix):
            e = ROUTED_EXPERT.match(key.removesuffix(suffix))
            if e and int(e["e"]) >= experts:
                return True
    return False


def plan_slice(
    ckpt: Checkpoint,
    layers: int | Sequence[int] = DEFAULT_LAYERS,
    experts: int = DEFAULT_EXPERTS,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> SlicePlan:
    """Every output tensor (``release_tensors`` of the sliced config, in its order) and its source.

    Reads only headers and the hash layers' tid2eid tables (a few MB each)."""
    if ckpt.config is None:
        raise DsV4Error(f"{ckpt.root}: no {CONFIG_NAME}; {STEP} rewrites it and needs it")
    config = ckpt.config
    total = int(config["num_hidden_layers"])
    kept = select_layers(config, layers)
    new_config = sliced_config(config, kept, experts)
    sources: dict[str, Source] = {}
    planned: list[PlannedTensor] = []
    problems: list[str] = []
    for spec in release_tensors(new_config):
        src_key = _source_key(spec.key, kept)
        info = ckpt.tensors.get(src_key)
        if info is None:
            problems.append(f"{src_key}: missing from the source (needed for {spec.key})")
            continue
        action = "copy"
        if spec.key.endswith((_GATE_ROWS, _GATE_BIAS)):
            action = "rows"
        elif spec.key.endswith(_TID2EID):
            action = "remap"
        want_src = spec.shape if action != "rows" else (config["n_routed_experts"], *spec.shape[1:])
        if info.dtype != spec.dtype or tuple(info.shape) != tuple(want_src):
            problems.append(
                f"{src_key}: {info.dtype} {list(info.shape)} in the source, the release layout of its config "
                f"says {spec.dtype} {list(want_src)}"
            )
            continue
        sources[spec.key] = Source(info, action)
        planned.append(PlannedTensor(spec.key, spec.dtype, spec.shape))
    used = {s.info.key for s in sources.values()}
    unknown = [k for k in ckpt.tensors if k not in used and not _expected_dropped(k, kept, experts, total)]
    problems += [
        f"{k}: not in the release layout of the source's config; {STEP} cannot slice it" for k in unknown[:10]
    ]
    if problems:
        raise DsV4Error(f"{ckpt.root}: cannot slice: {one_line(problems, show=3)}")
    remapped: dict[str, torch.Tensor] = {}
    rerouted: dict[str, int] = {}
    for key, src in sources.items():
        if src.action == "remap":
            ids = read_tensor(src.info)
            remapped[key] = remap_tid2eid(ids, experts)
            rerouted[key] = int((remapped[key] != ids).any(dim=1).sum())
    extras = files_to_copy(
        ckpt.root, rewritten=(CONFIG_NAME, REPORT_NAME), skip_suffixes=(".safetensors", ".partial")
    )
    output = plan_shards(planned, max_shard_bytes=max_shard_bytes)
    return SlicePlan(
        ckpt.root, dict(config), kept, experts, new_config, output, sources, remapped, rerouted, extras
    )


def produce_tensor(plan: SlicePlan, key: str) -> torch.Tensor:
    """One output tensor: the source's bytes, its first E rows, or the remapped tid2eid table."""
    src = plan.sources[key]
    if src.action == "remap":
        return plan.remapped[key]
    t = read_tensor(src.info)
    if src.action == "rows":
        t = t[: plan.experts].contiguous()
    check_read_values(src.info, t)  # what is copied on: a NaN scale or weight stops here, named
    return t


__all__ = ["SlicePlan", "Source", "plan_slice", "produce_tensor", "remap_tid2eid"]
