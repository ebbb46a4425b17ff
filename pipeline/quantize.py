"""`dsv4 quantize`, in-process driver: a BF16 checkpoint through real ModelOpt to an NVFP4 export.

Steps, each before the next can lose work:
1. validate the source (it must be BF16: an FP8 source broke the seeds' Run 1) and the output path;
   check every runtime patch target against the installed ModelOpt;
2. load with transformers, calibrate with ``mtq.quantize`` (CPU is enough for tiny models);
3. find enabled quantizers that never saw data and give them NVIDIA's fallback (weight amax from the
   weight; input amax from the largest calibrated expert of the same projection), listed in the report;
4. snapshot the calibrated state (every amax + ModelOpt's state, a few MB) to ``DST.calibration/`` so
   that ``--export-only`` can redo a failed export without calibrating again;
5. export with ``export_hf_checkpoint`` under the runtime patches into ``.DST.partial``, check every
   patch was reached, write the report beside it, and rename the directory to DST.

The node runs the same recipe through ModelOpt's own hf_ptq.py (pipeline/hf_ptq/).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from pipeline.checkpoint import Layout, ensure_valid, is_within, read_config
from pipeline.checkpoint.writer import output_lock
from pipeline.console import begin_log, third_party_output
from pipeline.device import resolve_device
from pipeline.errors import DsV4Error
from pipeline.quantize_checks import REPORT_NAME

STEP = "dsv4 quantize"
STATE_SUFFIX = ".calibration"
LOG_SUFFIX = ".log"
AMAX_FILE, STATE_FILE = "amax.safetensors", "modelopt_state.pt"
_EXPERT_INDEX = re.compile(r"\.experts\.(\d+)\.")
_FUSED_WEIGHT_QUANTIZER = re.compile(r"^(?P<parent>.*)\.(?P<param>\w+)_weight_quantizers\.(?P<expert>\d+)$")


@dataclass
class QuantizeOptions:
    recipe: str = "experts"
    calib_file: Path | None = None
    calib_size: int = 16
    calib_seq: int = 64
    calib_batch: int = 4
    seed: int = 0
    device: str = "auto"
    export_only: bool = False
    overwrite: bool = False


@dataclass
class Fallback:
    quantizer: str
    kind: str  # "weight" or "input"
    amax: float
    source: str  # where the value came from


@dataclass
class QuantizeReport:
    source: str
    export: str
    recipe: str
    calibration: dict
    quantizers: dict
    uncalibrated: list[Fallback] = field(default_factory=list)
    clamped_activation_scales: list[str] = field(default_factory=list)
    tensors_moved_to_cpu: int = 0  # weights and amax the export-on-cpu patch took off the GPU
    patches: list[dict] = field(default_factory=list)
    versions: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


def log_path_for(dst: Path) -> Path:
    """Where transformers' and ModelOpt's own output goes (beside DST, appended run after run)."""
    return dst.with_name(dst.name + LOG_SUFFIX)


def state_dir_for(dst: Path) -> Path:
    return dst.with_name(dst.name + STATE_SUFFIX)


def _vocab_size(src: Path) -> int:
    config = read_config(src) or {}
    vocab = config.get("vocab_size")
    if type(vocab) is not int or vocab <= 0:
        raise DsV4Error(f"{src / 'config.json'}: key vocab_size: {vocab!r} is not a positive integer")
    return vocab


def check_output_paths(src: Path, dst: Path, overwrite: bool) -> None:
    s, d = src.resolve(), dst.resolve()
    if is_within(d, s) or is_within(s, d):
        raise DsV4Error(f"{dst}: refusing to write the export inside (or around) the source {src}")
    if d.exists() and not d.is_dir():
        raise DsV4Error(f"{dst}: exists and is not a directory; the export is a directory, pick another DST")
    if d.exists() and any(d.iterdir()) and not overwrite:
        raise DsV4Error(f"{dst}: not empty; pass --overwrite to replace a previous export")
    if overwrite and d.is_dir() and any(d.iterdir()) and not (d / REPORT_NAME).is_file():
        # --overwrite deletes DST whole: only an export dsv4 quantize wrote (its report says so)
        shown = ", ".join(sorted(p.name for p in d.iterdir())[:4])
        raise DsV4Error(
            f"{dst}: refusing --overwrite: this folder was not written by dsv4 quantize (it holds {shown}, "
            f"no {REPORT_NAME}); choose an empty or new folder"
        )
    state = state_dir_for(dst)
    if state.exists() and not (state.is_dir() and (state / REPORT_NAME).is_file()):
        # the calibrated state is written there (and an old one of ours replaced): never someone's folder
        raise DsV4Error(
            f"{state}: exists and is not a calibrated state dsv4 quantize wrote (no {REPORT_NAME}); "
            "move it away or choose another DST"
        )


def _versions() -> dict:
    from pipeline.provenance import run_versions

    return run_versions(("nvidia-modelopt", "transformers", "torch"))


def load_bf16_model(src: Path, device: torch.device):
    from transformers import AutoConfig, DeepseekV4ForCausalLM

    config = AutoConfig.from_pretrained(src)
    if getattr(config, "quantization_config", None):
        raise DsV4Error(
            f"{src / 'config.json'}: has a quantization_config; {STEP} needs the BF16 checkpoint `dsv4 dequant` writes"
        )
    model = DeepseekV4ForCausalLM.from_pretrained(src, config=config, dtype=torch.bfloat16)
    # export_hf_checkpoint raises TypeError ('NoneType' object is not iterable) without architectures
    model.config.architectures = model.config.architectures or [type(model).__name__]
    return model.to(device).eval()


def quantizers(model) -> dict[str, torch.nn.Module]:
    from modelopt.torch.quantization.nn import TensorQuantizer

    found = {n: m for n, m in model.named_modules() if isinstance(m, TensorQuantizer)}
    for name, q in found.items():
        q._dsv4_name = name  # lets the patches name the quantizer in warnings and the report
    return found


def _has_amax(q) -> bool:
    amax = getattr(q, "_amax", None)
    return amax is not None and bool(torch.isfinite(amax).all()) and bool((amax > 0).all())


def _weight_of(model, name: str) -> torch.Tensor:
    """The weight a weight quantizer quantizes: `<linear>.weight`, or one expert's slice of a fused
    3-D parameter for `<experts>.<param>_weight_quantizers.<E>`."""
    fused = _FUSED_WEIGHT_QUANTIZER.match(name)
    if fused:
        parent = model.get_submodule(fused["parent"])
        return getattr(parent, fused["param"])[int(fused["expert"])]
    return model.get_submodule(name.rsplit(".", 1)[0]).weight


def enabled_quantizers(found: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Module]:
    """The enabled weight and input quantizers: those whose amax the export turns into scales."""
    return {
        n: q for n, q in found.items() if q.is_enabled and ("weight_quantizer" in n or "input_quantizer" in n)
    }


def amax_snapshot(found: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Every quantizer's amax as AMAX_FILE holds it (float32 on the CPU), by ModelOpt's module name:
    dsv4 quantize's calibration snapshot, and dsv4 calibrate's AMAX file, layer by layer."""
    return {
        n: q._amax.detach().float().cpu().contiguous()
        for n, q in found.items()
        if getattr(q, "_amax", None) is not None
    }


def apply_fallbacks(model, found: dict[str, torch.nn.Module]) -> list[Fallback]:
    """Give every enabled weight/input quantizer without a usable amax NVIDIA's fallback."""
    enabled = enabled_quantizers(found)
    missing = [n for n, q in enabled.items() if not _has_amax(q)]
    out: list[Fallback] = []
    for name in missing:
        q = enabled[name]
        if "weight_quantizer" in name:
            weight = _weight_of(model, name)
            value = weight.detach().abs().amax().float()
            source = f"max |weight| of {name.rsplit('.', 1)[0] if not _FUSED_WEIGHT_QUANTIZER.match(name) else name}"
        else:
            group = _EXPERT_INDEX.sub(".experts.*.", name)
            peers = [
                p
                for p, pq in enabled.items()
                if p != name and _EXPERT_INDEX.sub(".experts.*.", p) == group and _has_amax(pq)
            ]
            if group == name or not peers:
                raise DsV4Error(
                    f"{name}: input quantizer saw no calibration data and has no calibrated expert of the same "
                    "projection to borrow from; calibrate with more (or more varied) samples"
                )
            best = max(peers, key=lambda p: float(enabled[p]._amax.float().max()))
            value = enabled[best]._amax.detach().float().max()
            source = f"largest calibrated input amax of {group} ({best})"
        device = q._amax.device if getattr(q, "_amax", None) is not None else weight_device(model)
        if hasattr(q, "_amax") and q._amax is None:
            del q._amax  # a None buffer: ModelOpt's amax setter registers a fresh one only when absent
        q.amax = value.to(device)
        out.append(Fallback(name, "weight" if "weight_quantizer" in name else "input", float(value), source))
    return out


def weight_device(model) -> torch.device:
    return next(model.parameters()).device


def save_state(model, found: dict[str, torch.nn.Module], state_dir: Path, report: QuantizeReport) -> None:
    """amax of every quantizer + ModelOpt's state + the report so far, written to a temp dir and renamed."""
    import modelopt.torch.opt as mto
    from safetensors.torch import save_file

    tmp = state_dir.with_name(f".{state_dir.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(amax_snapshot(found), tmp / AMAX_FILE)
    torch.save(mto.modelopt_state(model), tmp / STATE_FILE)
    (tmp / REPORT_NAME).write_text(report.to_json())
    for f in tmp.iterdir():
        with f.open("rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(state_dir, ignore_errors=True)
    tmp.rename(state_dir)


def restore_state(model, state_dir: Path) -> dict[str, torch.nn.Module]:
    import modelopt.torch.opt as mto
    from safetensors.torch import load_file

    if not (state_dir / AMAX_FILE).is_file() or not (state_dir / STATE_FILE).is_file():
        raise DsV4Error(
            f"{state_dir}: no calibrated state ({AMAX_FILE}, {STATE_FILE}); run without --export-only first"
        )
    mto.restore_from_modelopt_state(
        model, modelopt_state=torch.load(state_dir / STATE_FILE, weights_only=False)
    )
    found = quantizers(model)
    amax = load_file(state_dir / AMAX_FILE)
    unknown = sorted(amax.keys() - found.keys())
    if unknown:
        raise DsV4Error(f"{state_dir / AMAX_FILE}: quantizer {unknown[0]} is not in the restored model")
    device = weight_device(model)
    for name, value in amax.items():
        found[name].amax = value.to(device)
    return found


def validate_state(state_dir: Path) -> tuple[bool, str]:
    """--validate-only: is the saved calibrated state complete and usable? (ok, summary)"""
    from safetensors.torch import load_file

    if not (state_dir / AMAX_FILE).is_file():
        return False, f"{state_dir}: no {AMAX_FILE}"
    amax = load_file(state_dir / AMAX_FILE)
    bad = [n for n, t in amax.items() if not (torch.isfinite(t).all() and (t > 0).all())]
    lines = [f"{state_dir}: {len(amax)} quantizer amax values, {len(bad)} not finite and positive"]
    lines += [f"  {n}: {amax[n].tolist()}" for n in bad[:20]]
    if not (state_dir / STATE_FILE).is_file():
        lines.append(f"  missing {STATE_FILE}")
        return False, "\n".join(lines)
    return not bad, "\n".join(lines)


def calibration_batches(vocab: int, src: Path, opts: QuantizeOptions) -> tuple[list[torch.Tensor], dict]:
    """The calibration batches, read before the model is loaded: a bad --calib-file costs no model load."""
    from pipeline.calibration import builtin_batches, file_batches

    if opts.calib_file:
        batches = file_batches(opts.calib_file, src, vocab, opts.calib_size, opts.calib_seq, opts.calib_batch)
        origin = str(opts.calib_file)
    else:
        batches = builtin_batches(vocab, opts.calib_size, opts.calib_seq, opts.calib_batch, opts.seed)
        origin = f"built-in: seeded random token ids (seed {opts.seed})"
    info = {"source": origin, "samples": sum(len(b) for b in batches), "seq_len": int(batches[0].shape[1])}
    return batches, info


def quantize_checkpoint(src: str | Path, dst: str | Path, opts: QuantizeOptions) -> QuantizeReport:
    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    state_dir = state_dir_for(dst)
    ensure_valid(src, expect=Layout.BF16, step=STEP)
    check_output_paths(src, dst, opts.overwrite)  # before the lock: a file at DST is refused without a trace
    # one run per DST: a second would remove this one's .DST.partial and the state beside it
    with output_lock(dst.parent, dst.with_name(f".{dst.name}.dsv4.lock"), subject=dst):
        check_output_paths(src, dst, opts.overwrite)  # again: a run that held the lock may have just finished
        with third_party_output(log_path_for(dst), defer=True):
            return _quantize_locked(src, dst, state_dir, opts, start)


def _quantize_locked(src: Path, dst: Path, state_dir: Path, opts: QuantizeOptions, start: float):
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint

    from patches import modelopt_patches
    from pipeline.recipes import recipe_config

    modelopt_patches.check_targets()  # before the long work: a moved target fails now, not after export
    device = resolve_device(opts.device)
    if not opts.export_only:
        batches, calibration = calibration_batches(_vocab_size(src), src, opts)
    begin_log()  # past the refusals: from here on what transformers and ModelOpt say is kept
    model = load_bf16_model(src, device)

    report = QuantizeReport(str(src), str(dst), opts.recipe, {}, {}, versions=_versions())
    if opts.export_only:
        found = restore_state(model, state_dir)
        saved = json.loads((state_dir / REPORT_NAME).read_text())
        report.calibration = saved.get("calibration", {})
        report.uncalibrated = [Fallback(**f) for f in saved.get("uncalibrated", [])]
        report.calibration["restored_from"] = str(state_dir)
    else:
        report.calibration = calibration

        def forward_loop(m):
            with torch.no_grad():
                for batch in batches:
                    m(input_ids=batch.to(device))

        mtq.quantize(model, recipe_config(opts.recipe), forward_loop)
        found = quantizers(model)
        report.uncalibrated = apply_fallbacks(model, found)
        save_state(model, found, state_dir, report)

    enabled = [n for n, q in found.items() if q.is_enabled]
    report.quantizers = {
        "enabled": len(enabled),
        "weight": sum("weight_quantizer" in n for n in enabled),
        "input": sum("input_quantizer" in n for n in enabled),
    }
    partial = dst.with_name(f".{dst.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    modelopt_patches.CLAMPED_ACTIVATION_SCALES.clear()
    modelopt_patches.MOVED_TO_CPU.clear()
    with modelopt_patches.applied() as patches:
        export_hf_checkpoint(model, export_dir=partial)
    report.clamped_activation_scales = list(modelopt_patches.CLAMPED_ACTIVATION_SCALES)
    report.tensors_moved_to_cpu = len(modelopt_patches.MOVED_TO_CPU)
    report.patches = [
        {"name": p.name, "target": f"{p.target.module}.{p.target.qualname}", "calls": p.calls}
        for p in patches
    ]
    report.seconds = round(time.perf_counter() - start, 2)
    (partial / REPORT_NAME).write_text(report.to_json())
    unreached = [p.name for p in patches if p.calls == 0]
    if unreached:
        raise DsV4Error(
            f"{partial}: runtime patch(es) {', '.join(unreached)} were never reached on the export path: the "
            "installed ModelOpt moved their targets, so the failures they prevent are back. The export is left in "
            f"{partial} for inspection; update patches/modelopt_patches.py"
        )
    if dst.exists():
        shutil.rmtree(dst)
    partial.rename(dst)
    return report
