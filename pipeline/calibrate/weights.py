"""One decoder layer's weights, from the release straight into the transformers layer: read, dequantize
with the function `dsv4 dequant` uses (:func:`pipeline.dequant.convert`), place where and in the dtype
from_pretrained would (:class:`pipeline.calibrate.skeleton.Placer`).

The routed experts are fused in transformers (``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]);
transformers builds them with torch.stack + torch.cat, holding every expert twice. Here the fused
parameter is allocated once on the device and each expert copied into its slice as it is dequantized, so
a layer never takes more than its own size plus one tensor in flight (a V4 Pro layer is 48 GiB in BF16).
"""

from __future__ import annotations

import os
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.checkpoint import Checkpoint
from pipeline.dequant import Source, convert, plan_dequant
from pipeline.errors import DsV4Error

from .skeleton import Placement, Placer, init_computed_buffers

_LAYER = re.compile(r"layers\.(\d+)\.")
_READ_CHUNK = 64 << 20


@dataclass
class LayerSources:
    """The release tensors of every decoder layer, as `dsv4 dequant` plans them (weight + scale pairs)."""

    by_layer: dict[int, list[Source]]
    top: dict[str, Source]  # embed, head, final norm, hc_head: outside the decoder layers
    skipped: list[str] = field(default_factory=list)  # mtp.*: no module in transformers


def layer_sources(ckpt: Checkpoint) -> LayerSources:
    plan = plan_dequant(ckpt)
    by_layer: dict[int, list[Source]] = defaultdict(list)
    top: dict[str, Source] = {}
    skipped: list[str] = []
    for key, src in plan.sources.items():
        m = _LAYER.match(key)
        if m:
            by_layer[int(m[1])].append(src)
        elif key.startswith("mtp."):
            skipped.append(key)
        else:
            top[key] = src
    return LayerSources(dict(by_layer), top, skipped)


@dataclass
class LoadTimes:
    read: float = 0.0
    dequantize: float = 0.0
    bytes_read: int = 0


def prefetch(sources: list[Source]) -> int:
    """Read the bytes of ``sources`` from disk once (weight and scale ranges, in file order), so that the
    read and the dequantization can be timed apart: :func:`pipeline.dequant.convert` reads the tensor
    itself, then from the page cache. Returns the bytes read."""
    ranges = sorted(
        (info.file, info.begin, info.end) for s in sources for info in (s.weight, s.scale) if info is not None
    )
    buf = bytearray(_READ_CHUNK)
    total = 0
    by_file: dict[Path, list[tuple[int, int]]] = defaultdict(list)
    for path, begin, end in ranges:
        by_file[path].append((begin, end))
    for path, spans in by_file.items():
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as err:
            raise DsV4Error(f"{path}: cannot read: {err.strerror or err}") from err
        try:
            for begin, end in spans:
                pos = begin
                while pos < end:
                    n = os.preadv(fd, [memoryview(buf)[: min(_READ_CHUNK, end - pos)]], pos)
                    if n <= 0:
                        raise DsV4Error(f"{path}: truncated at byte {pos} (expected data to {end})")
                    pos += n
                total += end - begin
        finally:
            os.close(fd)
    return total


def _set(model, name: str, value: torch.Tensor) -> None:
    """Put ``value`` in the model as ``name``: a parameter stays a parameter, a buffer a buffer (as
    transformers' set_param_for_module does)."""
    path, _, leaf = name.rpartition(".")
    module = model.get_submodule(path)
    if leaf in module._buffers:
        module._buffers[leaf] = value
    else:
        module._parameters[leaf] = torch.nn.Parameter(value, requires_grad=value.is_floating_point())


def load_tensor(model, placer: Placer, src: Source, device: torch.device) -> torch.Tensor:
    """Dequantize one top-level release tensor and put it in ``model``; returns it."""
    placed = placer.place(src.weight.key)
    if placed is None or placed.expert is not None:
        raise DsV4Error(f"{src.weight.file}: key {src.weight.key}: transformers' model has no tensor for it")
    value = convert(src, device, keep_on_device=True).to(device=device, dtype=placed.dtype)
    _set(model, placed.target, value)
    return value


def load_layer(
    model, placer: Placer, index: int, sources: list[Source], device: torch.device, times: LoadTimes
) -> torch.nn.Module:
    """Make ``model.model.layers[index]`` real on ``device`` from its release tensors. Every tensor of the
    layer must come from the release, and every release tensor of the layer must land in it."""
    prefix = f"model.layers.{index}."
    t0 = time.perf_counter()
    times.bytes_read += prefetch(sources)
    times.read += time.perf_counter() - t0

    t0 = time.perf_counter()
    placements: list[tuple[Source, Placement]] = []
    for src in sources:
        placed = placer.place(src.weight.key)
        if placed is None or not placed.target.startswith(prefix):
            raise DsV4Error(
                f"{src.weight.file}: key {src.weight.key}: transformers' DeepseekV4ForCausalLM has no tensor "
                f"for it in layer {index} (renamed to {placed.target if placed else 'nothing'})"
            )
        placements.append((src, placed))
    fused: dict[str, torch.Tensor] = {}
    parts: dict[str, int] = {}
    filled: dict[str, set[tuple[int, int]]] = defaultdict(set)
    for src, placed in placements:
        value = convert(src, device, keep_on_device=True)
        if placed.expert is None:
            _set(model, placed.target, value.to(device=device, dtype=placed.dtype))
            continue
        ref = placer.meta[placed.target]
        if placed.target not in fused:
            fused[placed.target] = torch.empty(ref.shape, dtype=placed.dtype, device=device)
            parts[placed.target] = placed.parts
        width = ref.shape[1] // placed.parts
        if tuple(value.shape) != (width, *ref.shape[2:]) or not 0 <= placed.expert < ref.shape[0]:
            raise DsV4Error(
                f"{src.weight.file}: key {src.weight.key}: shape {tuple(value.shape)} (expert {placed.expert}) "
                f"does not fit {placed.target} {tuple(ref.shape)}"
            )
        rows = slice(placed.part * width, (placed.part + 1) * width)
        fused[placed.target][placed.expert, rows].copy_(value)
        filled[placed.target].add((placed.expert, placed.part))
        del value
    for target, tensor in fused.items():
        want = {(e, p) for e in range(tensor.shape[0]) for p in range(parts[target])}
        if filled[target] != want:
            missing = sorted(want - filled[target])[:3]
            raise DsV4Error(
                f"{target}: the release lacks expert(s) {missing} (expert, w1/w3 part) of layer {index}"
            )
        _set(model, target, tensor)
    layer = model.model.layers[index]
    init_computed_buffers(model, layer, device)
    left = [n for n, t in [*layer.named_parameters(), *layer.named_buffers()] if t.is_meta]
    if left:
        raise DsV4Error(
            f"layer {index}: no release tensor for {prefix}{left[0]}"
            + (f" (and {len(left) - 1} more)" if len(left) > 1 else "")
        )
    times.dequantize += time.perf_counter() - t0
    return layer.eval()
