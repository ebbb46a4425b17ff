"""The actions of `dsv4 convert`, one runner each: a :class:`~pipeline.convert.jobs.Job`'s input tensors
in, its output tensors out, on the device given. ``RUNNERS`` maps pipeline.mapping's action names to them;
:func:`run_job` reads a job's inputs (checking every value it reads) and runs it. The stream converter
(pipeline/convert/stream.py) runs the same table, so both give the same bytes.

What the runners measure (how unifying w1/w3 global scales and transcoding MXFP4 changed the weights)
goes into a :class:`RunStats` that threads add to.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pipeline import mapping as M
from pipeline.checkpoint import read_tensor
from pipeline.checkpoint.validate import check_read_values
from pipeline.errors import DsV4Error
from pipeline.formats import (
    NVFP4_BLOCK,
    fp8_block_dequantize,
    fp8_block_quantize,
    mxfp4_dequantize,
    mxfp4_requantize_nvfp4,
    mxfp4_to_nvfp4_shared,
    nvfp4_dequantize,
    nvfp4_global_scale,
    nvfp4_quantize,
    nvfp4_rescale,
)
from pipeline.formats.e2m1 import block_square_sums
from pipeline.formats.fp8_block import STRIP_ELEMENTS

from .jobs import Job


@dataclass
class UnifyStats:
    """What giving w1 and w3 one global scale cost, measured on the experts converted in this run."""

    experts: int = 0  # experts whose w1/w3 global scales were compared
    changed: int = 0  # of those, the ones whose scales differed
    max_ratio: float = 1.0  # largest larger/smaller global-scale ratio
    max_rel_error: float = 0.0  # largest ||W' - W|| / ||W|| of a rescaled tensor
    err_sq: float = 0.0
    ref_sq: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, ratio: float, err_sq: float, ref_sq: float) -> None:
        with self._lock:
            self.experts += 1
            if ratio != 1.0:
                self.changed += 1
                self.max_ratio = max(self.max_ratio, ratio)
                self.err_sq += err_sq
                self.ref_sq += ref_sq
                if ref_sq:
                    self.max_rel_error = max(self.max_rel_error, math.sqrt(err_sq / ref_sq))

    @property
    def rel_error(self) -> float:
        """||error|| / ||weight|| over every rescaled tensor together."""
        return math.sqrt(self.err_sq / self.ref_sq) if self.ref_sq else 0.0


@dataclass
class TranscodeStats:
    """How exactly the release's MXFP4 experts became NVFP4 (pipeline.formats.mxfp4_to_nvfp4)."""

    tensors: int = 0
    exact: int = 0  # tensors whose every block kept its value
    requantized_blocks: int = 0  # blocks below the e4m3 window, re-encoded at the smallest scale
    blocks: int = 0
    max_rel_error: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, report) -> None:
        with self._lock:
            self.tensors += 1
            self.exact += int(report.exact)
            self.requantized_blocks += report.requantized_blocks
            self.blocks += report.blocks
            self.max_rel_error = max(self.max_rel_error, report.relative_error)


@dataclass
class RunStats:
    """What the jobs of one run measured (threads add to it)."""

    unify: UnifyStats = field(default_factory=UnifyStats)
    transcode: TranscodeStats = field(default_factory=TranscodeStats)


# ---- running one job ---------------------------------------------------------------------------


def _to(device: torch.device, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.to(device, non_blocking=True) for t in tensors]


def _run_nvfp4_to_fp8(job: Job, t: list[torch.Tensor], device: torch.device, stats: RunStats):
    codes, bs, gs = _to(device, *t)
    # strips of whole 128-row tiles (same bytes): the float32 weight never exists whole
    strip = max(1, STRIP_ELEMENTS // (codes.shape[1] * 2 * 128)) * 128
    parts = [
        fp8_block_quantize(
            nvfp4_dequantize(codes[i : i + strip], bs[i : i + strip], gs, torch.float32), scale_fmt="ue8m0"
        )
        for i in range(0, codes.shape[0], strip)
    ]
    return torch.cat([q for q, _ in parts]), torch.cat([sc for _, sc in parts])


def _run_nvfp4_to_bf16(job: Job, t: list[torch.Tensor], device: torch.device, stats: RunStats):
    codes, bs, gs = _to(device, *t)
    return (nvfp4_dequantize(codes, bs, gs, torch.bfloat16),)


def _run_bf16_to_fp8(job: Job, t: list[torch.Tensor], device: torch.device, stats: RunStats):
    (w,) = _to(device, *t)
    return fp8_block_quantize(w, scale_fmt="ue8m0")


def _run_cast(job: Job, t: list[torch.Tensor], device: torch.device, stats: RunStats):
    from pipeline.checkpoint.dtypes import to_torch

    return (t[0].to(to_torch(job.params[0])),)


def _run_unify(job: Job, t: list[torch.Tensor], device: torch.device, stats: RunStats):
    bs1, gs1, bs3, gs3 = _to(device, *t)
    common = torch.maximum(gs1.float(), gs3.float())
    out = []
    ratio = 1.0
    err_sq = ref_sq = 0.0
    for bs, gs, weight in ((bs1, gs1, job.params[0]), (bs3, gs3, job.params[1])):
        if bool(gs.float() == common):
            out += [bs, gs]
            continue
        ratio = float(common / gs.float())
        new_bs = nvfp4_rescale(bs, gs, common)
        # exact added error: each block's codes are unchanged, only its scale product moves. The weight
        # is read for its blocks' energies alone, computed where it was read (on CUDA it was copied to
        # the device whole for them: a third of the experts' bytes once more)
        energy = block_square_sums(read_tensor(weight), NVFP4_BLOCK)
        before = (bs.float() * gs.float()).cpu()
        after = (new_bs.float() * common).cpu()
        err_sq += float((energy * (after - before).pow(2)).double().sum())
        ref_sq += float((energy * before.pow(2)).double().sum())
        out += [new_bs, common.reshape(()).clone()]
    stats.unify.add(ratio, err_sq, ref_sq)
    return tuple(out)


def _run_transcode(job: Job, t: list[torch.Tensor], device: torch.device, stats: RunStats):
    t = _to(device, *t)
    pairs = [(t[i], t[i + 1]) for i in range(0, len(t), 2)]
    out = []
    # one m for w1 and w3: vLLM keeps w1's weight_scale_2 for w13
    for q, ws, ws2, report in mxfp4_to_nvfp4_shared(*pairs):
        stats.transcode.add(report)
        out += [q, ws, ws2]
    return tuple(out)


def _run_bf16_to_nvfp4(job: Job, t: list[torch.Tensor], device: torch.device, stats: RunStats):
    t = _to(device, *t)
    # one global scale for the group (w1 with w3), from the larger amax: what vLLM's fused w13 keeps
    global_scale = nvfp4_global_scale(torch.stack([w.float().abs().amax() for w in t]).amax())
    out = []
    for w in t:
        packed, block, _ = nvfp4_quantize(w, weight_scale_2=global_scale)
        out += [packed, block, global_scale.clone()]
    return tuple(out)


# ---- from the release and an amax file (dsv4 convert RELEASE --amax) --------------------------------
# Each composes the steps of the export path on the same values: dsv4 dequant's exact BF16, ModelOpt's
# NVFP4 rule with the calibrated weight_scale_2 (nvfp4_quantize is ModelOpt 0.47's, bit for bit), then
# convert's own runner for what an export's tensor becomes. So the bytes are the export path's.


def _global_scale(amax: float | None, weights: list[torch.Tensor]) -> torch.Tensor:
    """weight_scale_2 = amax / (6*448) in float32; with no amax (NVIDIA's dumps may lack one), the amax
    ModelOpt would calibrate: the largest |w| over the group (w1 with w3)."""
    if amax is None:
        return nvfp4_global_scale(torch.stack([w.float().abs().amax() for w in weights]).amax())
    return nvfp4_global_scale(torch.tensor(amax, dtype=torch.float32, device=weights[0].device))


def _run_requantize_expert(job: Job, t: list[torch.Tensor], device: torch.device, stats: RunStats):
    t = _to(device, *t)
    pairs = [(t[i], t[i + 1]) for i in range(0, len(t), 2)]
    if job.params[0] is None:  # the global amax of the BF16 weights themselves: they are needed whole
        weights = [mxfp4_dequantize(packed, scale, torch.bfloat16) for packed, scale in pairs]
        global_scale = _global_scale(None, weights)
        quantized = [nvfp4_quantize(w, weight_scale_2=global_scale)[:2] for w in weights]
    else:  # the same bytes without the BF16 weights (pipeline.formats.requantize)
        global_scale = _global_scale(job.params[0], [t[0]])
        quantized = [mxfp4_requantize_nvfp4(packed, scale, global_scale) for packed, scale in pairs]
    # one global scale for w1 and w3: vLLM's w13 keeps w1's
    return tuple(x for packed, block in quantized for x in (packed, block, global_scale.clone()))


def _via_nvfp4(w: torch.Tensor, amax: float | None) -> list[torch.Tensor]:
    packed, block, global_scale = nvfp4_quantize(w, weight_scale_2=_global_scale(amax, [w]))
    return [packed, block, global_scale]


def _run_fp8_via_nvfp4(job: Job, t: list[torch.Tensor], device: torch.device, stats: RunStats):
    weight, scale = _to(device, *t)
    bf16 = fp8_block_dequantize(weight, scale, dtype=torch.bfloat16)
    return _run_nvfp4_to_fp8(job, _via_nvfp4(bf16, job.params[0]), device, stats)


def _run_bf16_via_nvfp4(job: Job, t: list[torch.Tensor], device: torch.device, stats: RunStats):
    (w,) = _to(device, *t)
    return _run_nvfp4_to_bf16(job, _via_nvfp4(w, job.params[0]), device, stats)


def _run_fp8_requant(job: Job, t: list[torch.Tensor], device: torch.device, stats: RunStats):
    weight, scale = _to(device, *t)
    return _run_bf16_to_fp8(job, [fp8_block_dequantize(weight, scale, dtype=torch.bfloat16)], device, stats)


def _run_input_scale(job: Job, t: list[torch.Tensor], device: torch.device, stats: RunStats):
    # ModelOpt: amax.float() / (maxbound * 448), float32 throughout
    return (nvfp4_global_scale(torch.tensor(job.params[0], dtype=torch.float32)),)


def _run_constant(job: Job, t: list[torch.Tensor], device: torch.device, stats: RunStats):
    return (torch.tensor(job.params[0], dtype=torch.float32),)


def _run_copy(job: Job, t: list[torch.Tensor], device: torch.device, stats: RunStats):
    return (t[0],)


RUNNERS: dict[str, Callable] = {
    M.COPY: _run_copy,
    M.KEEP_NVFP4: _run_copy,
    M.GRAFT: _run_copy,
    M.CAST: _run_cast,
    M.NVFP4_TO_FP8: _run_nvfp4_to_fp8,
    M.NVFP4_TO_BF16: _run_nvfp4_to_bf16,
    M.BF16_TO_FP8: _run_bf16_to_fp8,
    M.UNIFY_W13: _run_unify,
    M.TRANSCODE: _run_transcode,
    M.FALLBACK_INPUT_SCALE: _run_constant,
    M.BF16_TO_NVFP4: _run_bf16_to_nvfp4,
    M.REQUANTIZE_EXPERT: _run_requantize_expert,
    M.INPUT_SCALE: _run_input_scale,
    M.FP8_VIA_NVFP4: _run_fp8_via_nvfp4,
    M.BF16_VIA_NVFP4: _run_bf16_via_nvfp4,
    M.FP8_REQUANT: _run_fp8_requant,
}


# The actions a job asks a GPU thread for (pipeline.checkpoint.producer.Converters): float arithmetic
# over every element, which a GPU does many times faster than a CPU core. The others are table lookups
# (transcode), a few scales (unify) or copies: CPU threads keep up with the disk on them, where a GPU
# would first copy the tensors across and back (docs/benchmarks.md, the H100 runs of 2026-12-06).
GPU_ACTIONS = frozenset(
    {
        M.NVFP4_TO_FP8,
        M.NVFP4_TO_BF16,
        M.BF16_TO_FP8,
        M.BF16_TO_NVFP4,
        M.REQUANTIZE_EXPERT,
        M.FP8_VIA_NVFP4,
        M.BF16_VIA_NVFP4,
        M.FP8_REQUANT,
    }
)


def run_job(job: Job, stats: RunStats, device: torch.device) -> tuple[torch.Tensor, ...]:
    tensors = [read_tensor(i) for i in job.inputs]
    # every scale and FP8 weight a job reads is checked here, where it is read: validation samples the
    # scales, so a bad one it missed is named (file and key) instead of failing inside an action
    for info, t in zip(job.inputs, tensors, strict=True):
        check_read_values(info, t)
    out = run_action(job, tensors, device, stats)
    if len(out) != len(job.outputs):  # pragma: no cover - a bug in a runner
        raise AssertionError(f"{job.name}: {len(out)} tensors for {len(job.outputs)} outputs")
    return tuple(o.cpu() for o in out)


def run_action(job: Job, tensors: list[torch.Tensor], device: torch.device, stats: RunStats):
    """RUNNERS[job.action], with the ValueError a format function raises for values it cannot take (a
    NaN BF16 weight, a product that overflows) turned into a DsV4Error naming the job's first input."""
    try:
        return RUNNERS[job.action](job, tensors, device, stats)
    except ValueError as err:
        where = f"{job.inputs[0].file}: key {job.inputs[0].key}" if job.inputs else job.name
        raise DsV4Error(f"{where}: cannot {job.action}: {err}") from err


__all__ = ["GPU_ACTIONS", "RUNNERS", "RunStats", "TranscodeStats", "UnifyStats", "run_action", "run_job"]
