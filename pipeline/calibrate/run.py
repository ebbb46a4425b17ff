"""`dsv4 calibrate RELEASE AMAX`: ModelOpt's calibration of DeepSeek V4, one decoder layer at a time,
straight from the release (no BF16 copy), resumable, with the amax whole-model calibration records.

1. validate the release, AMAX's path and the calibration data before any model exists;
2. build transformers' model on the meta device (skeleton.py), make the embedding and rotary tables
   real, and capture layer 0's inputs for every batch (capture.py);
3. for each layer: read and dequantize its release tensors into it (weights.py), calibrate it with the
   recipe's quantizers, keep its outputs as the next layer's inputs (loop.py), commit its amax and those
   outputs to the work folder (workdir.py), and free it before the next one is read;
4. merge the layers' amax into AMAX (amax_file.py), renamed into place, and remove the work folder.

The MTP block is not calibrated: transformers' DeepseekV4ForCausalLM has no MTP module, so whole-model
calibration (`dsv4 quantize`, hf_ptq) records no MTP amax either; `dsv4 convert` gives MTP experts the
fallback activation scale as it does for those exports.
"""

from __future__ import annotations

import gc
import hashlib
import time
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from pipeline.checkpoint import Layout, ensure_valid, is_within, read_config
from pipeline.checkpoint.journal import fingerprint_inputs
from pipeline.checkpoint.writer import output_lock
from pipeline.console import begin_log, third_party_output
from pipeline.device import resolve_device
from pipeline.errors import DsV4Error
from pipeline.progress import Progress, human_seconds

from .amax_file import read_metadata, write_amax
from .workdir import MANIFEST_FORMAT, WorkDir, work_dir_for

STEP = "dsv4 calibrate"
LOG_SUFFIX = ".log"
MTP_NOTE = (
    "not calibrated: transformers' DeepseekV4ForCausalLM has no MTP module, so whole-model calibration "
    "records no MTP amax either"
)


@dataclass
class CalibrateOptions:
    recipe: str = "experts"
    calib_file: Path | None = None
    samples: int = 16  # the defaults of dsv4 quantize (QuantizeOptions), so both see the same batches
    seq_len: int = 64
    batch: int = 4
    seed: int = 0
    device: str = "auto"
    overwrite: bool = False  # replace an AMAX file an earlier dsv4 calibrate wrote
    restart: bool = False  # discard a work folder left by a run with other inputs or options
    progress: bool = True
    # run at most this many layers in this call and keep the work folder: a later call resumes (tests, benches)
    stop_after: int | None = None


@dataclass
class LayerReport:
    layer: int
    read_s: float  # the layer's release bytes from disk
    dequantize_s: float  # release -> BF16 on the device, placed in the layer
    forward_s: float  # quantizers inserted, the calibration forward over every batch, fallbacks
    write_s: float  # the layer's amax and its outputs committed to the work folder
    bytes_read: int
    amax: int
    fallbacks: int
    peak_device_bytes: int | None  # torch.cuda.max_memory_allocated during this layer (CUDA only)


@dataclass
class CalibrateReport:
    release: str
    amax: str
    recipe: str
    calibration: dict
    device: str
    total_layers: int
    kept_layers: int = 0  # committed by an interrupted run and not redone
    layers: list[LayerReport] = field(default_factory=list)
    capture_s: float = 0.0
    amax_keys: int = 0
    fallbacks: list[dict] = field(default_factory=list)
    mtp_tensors_skipped: int = 0
    peak_device_bytes: int | None = None
    complete: bool = False
    seconds: float = 0.0
    versions: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def log_path_for(amax: Path) -> Path:
    return amax.with_name(amax.name + LOG_SUFFIX)


def check_paths(release: Path, amax: Path, overwrite: bool) -> None:
    r, a = release.resolve(), amax.resolve()
    if is_within(a, r):
        raise DsV4Error(
            f"{amax}: refusing to write AMAX inside the release {release}; never write into an input"
        )
    if a.is_dir():
        raise DsV4Error(f"{amax}: is a directory; AMAX is one .safetensors file, name a file")
    if a.exists():
        if not overwrite:
            raise DsV4Error(f"{amax}: exists; pass --overwrite to replace an AMAX file dsv4 calibrate wrote")
        if read_metadata(a) is None:
            raise DsV4Error(
                f"{amax}: refusing --overwrite: not an AMAX file dsv4 calibrate wrote (no such metadata)"
            )


def check_options(opts: CalibrateOptions) -> None:
    from pipeline.recipes import RECIPES

    if opts.recipe not in RECIPES:
        raise DsV4Error(f"--recipe {opts.recipe!r}: must be one of {', '.join(RECIPES)}")
    for name in ("samples", "seq_len", "batch"):
        value = getattr(opts, name)
        if type(value) is not int or value <= 0:
            raise DsV4Error(f"--{name.replace('_', '-')} {value!r}: must be a positive integer")


def _release_config(release: Path) -> dict:
    config = read_config(release)
    where = release / "config.json"
    if config is None:
        raise DsV4Error(f"{where}: missing; the release's config.json is needed to build the model")
    for key in ("vocab_size", "num_hidden_layers"):
        if type(config.get(key)) is not int or config[key] <= 0:
            raise DsV4Error(f"{where}: key {key}: {config.get(key)!r} is not a positive integer")
    return config


def _versions() -> dict:
    from pipeline.provenance import run_versions

    return run_versions(("nvidia-modelopt", "transformers", "torch", "safetensors"))


def _batches(release: Path, vocab: int, opts: CalibrateOptions) -> tuple[list[torch.Tensor], dict]:
    """The batches `dsv4 quantize` would calibrate with for the same options: its own function, fed the
    same fields, so the built-in set and the file reading cannot drift apart."""
    from pipeline.quantize import QuantizeOptions, calibration_batches

    q = QuantizeOptions(
        recipe=opts.recipe,
        calib_file=opts.calib_file,
        calib_size=opts.samples,
        calib_seq=opts.seq_len,
        calib_batch=opts.batch,
        seed=opts.seed,
    )
    batches, info = calibration_batches(vocab, release, q)
    digest = hashlib.sha256()
    for b in batches:
        digest.update(str(tuple(b.shape)).encode() + b.to(torch.int64).numpy().tobytes())
    return batches, {**info, "batch": opts.batch, "seed": opts.seed, "tokens_sha256": digest.hexdigest()}


def _manifest(release: Path, opts: CalibrateOptions, calibration: dict, device: torch.device, versions: dict):
    inputs = [release] + ([Path(opts.calib_file)] if opts.calib_file else [])
    return {
        "format": MANIFEST_FORMAT,
        "release": str(release.resolve()),
        "inputs": fingerprint_inputs(inputs),
        "recipe": opts.recipe,
        "calibration": calibration,
        "device": device.type,  # a CPU and a GPU forward may round differently: never mix their layers
        "versions": versions,
    }


class _FreedCheck:
    """The memory promise, checked: before a layer is read, the previous layer's tensors must be gone
    (weak references dead), so the loop never holds two layers' weights."""

    def __init__(self) -> None:
        self.refs: list[weakref.ref] = []
        self.layer = -1

    def track(self, index: int, layer: torch.nn.Module) -> None:
        self.layer = index
        self.refs = [weakref.ref(t) for t in [*layer.parameters(), *layer.buffers()]]

    def check(self) -> None:
        gc.collect()
        alive = sum(r() is not None for r in self.refs)
        if alive:
            raise DsV4Error(
                f"layer {self.layer}: {alive} of its tensors are still referenced after it was freed; the next layer "
                "would load beside it (a bug in pipeline/calibrate: something keeps a reference)"
            )


def _peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def calibrate_release(
    release: str | Path, amax: str | Path, opts: CalibrateOptions | None = None
) -> CalibrateReport:
    """Calibrate ``release`` layer by layer and write AMAX; the report has per-layer seconds (read,
    dequantize, forward, write) and peak device memory. With ``opts.stop_after`` it stops after that many
    layers, keeps the work folder (a later call resumes) and returns ``complete=False``."""
    start = time.perf_counter()
    opts = opts or CalibrateOptions()
    release, amax = Path(release), Path(amax)
    check_options(opts)
    check_paths(release, amax, opts.overwrite)
    ckpt = ensure_valid(release, expect=Layout.RELEASE, step=STEP)
    config = _release_config(release)
    batches, calibration = _batches(release, config["vocab_size"], opts)
    with output_lock(amax.parent, amax.with_name(f".{amax.name}.dsv4.lock"), subject=amax):
        check_paths(release, amax, opts.overwrite)  # again: a run that held the lock may have just finished
        with third_party_output(log_path_for(amax), defer=True):
            return _calibrate_locked(release, amax, ckpt, config, batches, calibration, opts, start)


def _import_third_party() -> None:
    """Import ModelOpt and transformers' model here, in a frame that holds nothing. Their first import
    leaves frames of the importing call alive (seen with gc: pulp, which ModelOpt imports, keeps its
    import chain), and a function that imported them lazily would be pinned with its locals: the first
    layer's weights, caught by _FreedCheck."""
    import modelopt.torch.quantization  # noqa: F401
    import transformers.conversion_mapping
    import transformers.core_model_loading  # noqa: F401
    from transformers import AutoConfig, DeepseekV4ForCausalLM  # noqa: F401


def _calibrate_locked(release, amax, ckpt, config, batches, calibration, opts, start) -> CalibrateReport:
    from .capture import capture_layer_inputs
    from .loop import calibrate_layer, force_eager_experts
    from .skeleton import Placer, build_skeleton, materialize_inputs, skeleton_config
    from .weights import LoadTimes, layer_sources, load_layer, load_tensor

    _import_third_party()
    device = resolve_device(opts.device)
    sources = layer_sources(ckpt)
    n = config["num_hidden_layers"]
    if sorted(sources.by_layer) != list(range(n)):
        raise DsV4Error(
            f"{release / 'config.json'}: key num_hidden_layers: {n}, but the release has tensors for layers "
            f"{sorted(sources.by_layer)[:3]}...{sorted(sources.by_layer)[-1:]}"
        )
    if "embed.weight" not in sources.top:
        raise DsV4Error(f"{release}: key embed.weight: missing; the calibration starts from the embedding")
    versions = _versions()
    work = WorkDir(work_dir_for(amax))
    kept = work.open(_manifest(release, opts, calibration, device, versions), restart=opts.restart)
    report = CalibrateReport(
        str(release),
        str(amax),
        opts.recipe,
        calibration,
        str(device),
        n,
        kept_layers=kept,
        mtp_tensors_skipped=len(sources.skipped),
        versions=versions,
    )
    begin_log()  # past the refusals: from here on what transformers and ModelOpt say is kept
    meter = Progress(
        "calibrate",
        sum(s.read_bytes for srcs in sources.by_layer.values() for s in srcs),
        enabled=opts.progress,
    )
    if kept:
        meter.message(
            f"[calibrate] resuming: layers 0-{kept - 1} of {n} kept from the interrupted run in {work.path}"
        )

    t0 = time.perf_counter()
    model = build_skeleton(skeleton_config(config))
    force_eager_experts(model.config)
    placer = Placer(model)
    embed = load_tensor(model, placer, sources.top["embed.weight"], device)
    materialize_inputs(model, embed, device)
    del embed
    hidden, kwargs = capture_layer_inputs(model, batches, device)
    # all n kept: killed after the last commit, before AMAX was written; only the merge is left
    if 0 < kept < n:
        hidden = _resumed_hidden(work, kept, hidden, device)
    report.capture_s = time.perf_counter() - t0

    freed = _FreedCheck()
    for i in range(kept, n):
        if opts.stop_after is not None and i - kept >= opts.stop_after:
            report.seconds = time.perf_counter() - start
            return report
        freed.check()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = LoadTimes()
        layer = load_layer(model, placer, i, sources.by_layer[i], device, times)
        t1 = time.perf_counter()
        result = calibrate_layer(i, layer, opts.recipe, hidden, kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        forward = time.perf_counter() - t1
        freed.track(i, layer)
        model.model.layers[i] = torch.nn.Module()  # the skeleton lets go of the layer ...
        del layer  # ... and so do we: _FreedCheck proves it before the next read
        t1 = time.perf_counter()
        last = i == n - 1
        fallbacks = [asdict(f) for f in result.fallbacks]
        work.commit_layer(i, result.amax, {"fallbacks": fallbacks}, None if last else result.outputs)
        write = time.perf_counter() - t1
        hidden = result.outputs
        peak = _peak(device)
        report.layers.append(
            LayerReport(
                i,
                times.read,
                times.dequantize,
                forward,
                write,
                times.bytes_read,
                len(result.amax),
                len(fallbacks),
                peak,
            )
        )
        del result
        if device.type == "cuda":
            torch.cuda.empty_cache()
        meter.done += times.bytes_read
        per_layer = (time.perf_counter() - t0) / (i + 1 - kept)
        meter.message(
            f"[calibrate] layer {i + 1}/{n}: read {times.read:.1f} s, dequantize {times.dequantize:.1f} s, "
            f"forward {forward:.1f} s, write {write:.1f} s; {report.layers[-1].amax} amax"
            + (f", peak {peak / 2**30:.1f} GiB" if peak is not None else "")
            + f"; ETA {human_seconds(per_layer * (n - 1 - i))}"
        )
    freed.check()
    del hidden, kwargs, model

    merged, metas = work.merged(n)
    report.fallbacks = [f for m in metas for f in m.get("fallbacks", [])]
    report.amax_keys = len(merged)
    write_amax(
        amax,
        merged,
        {
            "recipe": opts.recipe,
            "calibration": calibration,
            "release": str(release),
            "layers": n,
            "device": device.type,
            "fallbacks": report.fallbacks,
            "mtp": MTP_NOTE,
            "versions": versions,
        },
    )
    work.remove()
    peaks = [r.peak_device_bytes for r in report.layers if r.peak_device_bytes is not None]
    report.peak_device_bytes = max(peaks) if peaks else None
    report.complete = True
    report.seconds = time.perf_counter() - start
    return report


def _resumed_hidden(work: WorkDir, index: int, captured: list[torch.Tensor], device: torch.device):
    hidden = work.hidden(index, device)
    shapes = [tuple(h.shape) for h in captured]
    if [tuple(h.shape) for h in hidden] != shapes or any(
        h.dtype != c.dtype for h, c in zip(hidden, captured, strict=True)
    ):
        raise DsV4Error(
            f"{work.path}: layer {index}'s saved inputs do not have the captured batches' shapes {shapes[:2]}...; "
            "the work folder is damaged: pass --restart"
        )
    return hidden
