"""Checks a step runs before its long work, and that `dsv4 validate` runs alone.

Everything is checked from headers except scale values: every index entry points at a shard that
holds it, no key is in two shards, headers agree with file sizes, each quantized weight has its scale
siblings with the right dtype and shape, config.json agrees with the tensors, and (reading only scale
tensors, a deterministic sample by default) scales are finite and positive. All problems are
collected into one :class:`ValidationReport`; nothing stops at the first.
"""

from __future__ import annotations

import json
import re
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import DsV4Error, one_line

from .layout import FP8_SCALE_SUFFIXES, Layout, LayoutInfo, classify_layout, layout_mismatch
from .reader import (
    CONFIG_NAME,
    INDEX_NAME,
    ShardHeader,
    TensorInfo,
    locate_with_index,
    read_config,
    read_header,
    read_tensor,
)

# The quant_method values for which vLLM builds DeepseekV4FP8Config, the config that reads the release's
# FP8 block weights and MXFP4 experts (vllm/models/deepseek_v4 override_quantization_method).
RELEASE_QUANT_METHODS = ("fp8", "deepseek_v4_fp8")
# ... and for NVFP4 tensors: ModelOpt's own export ('modelopt'; 'modelopt_fp4' in older exports), or the
# mixed layout `dsv4 convert` writes (quant_method fp8 + moe_quant_algo NVFP4, read by the same config).
# Absent is allowed there: an export from before ModelOpt wrote config.json's block has hf_quant_config.json.
NVFP4_QUANT_METHODS = ("modelopt", "modelopt_fp4", *RELEASE_QUANT_METHODS)
DEFAULT_SAMPLE = 128  # scale tensors read by default; --full-scales reads all (~24 GiB on the release)
MXFP4_BLOCK = 32
NVFP4_BLOCK = 16
SCALE_SUFFIXES = (".scale", ".weight_scale_inv", ".weight_scale", ".weight_scale_2", ".input_scale")


@dataclass(frozen=True)
class Problem:
    file: str
    key: str | None
    message: str

    def __str__(self) -> str:
        return f"{self.file}: key {self.key}: {self.message}" if self.key else f"{self.file}: {self.message}"


@dataclass
class ValidationReport:
    path: str
    problems: list[Problem] = field(default_factory=list)
    layout: str = Layout.UNKNOWN.value
    layout_evidence: str = ""
    shards: int = 0
    tensors: int = 0
    tensor_bytes: int = 0
    scales_checked: int = 0
    scales_total: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, file: str | Path, key: str | None, message: str) -> None:
        self.problems.append(Problem(str(file), key, message))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d

    def raise_if_invalid(self) -> None:
        if self.ok:
            return
        listing = f"`dsv4 validate {self.path}` lists them"
        raise DsV4Error(
            f"{self.path}: invalid checkpoint: {one_line([str(p) for p in self.problems], listing=listing)}"
        )


def validate_checkpoint(
    path: str | Path,
    *,
    full_scales: bool = False,
    sample_size: int = DEFAULT_SAMPLE,
    expect: Layout | None = None,
    step: str = "this step",
) -> ValidationReport:
    """Validate a checkpoint (directory, index file or single .safetensors file); never raises for a
    bad checkpoint, only collects problems. ``expect``: the layout the caller needs."""
    t0 = time.perf_counter()
    report = ValidationReport(str(path))
    try:
        root, index_path, shard_paths, weight_map = locate_with_index(path)
    except DsV4Error as err:
        report.add(path, None, str(err).removeprefix(f"{path}: "))
        return _done(report, t0)

    _check_unfinished_run(report, root)
    if weight_map is not None:
        named = set(weight_map.values())
        for stray in sorted(root.glob("*.safetensors")):
            if stray.name not in named:
                report.add(stray, None, f"shard not named by {INDEX_NAME} (left over from another run?)")

    headers: dict[str, ShardHeader] = {}
    keys_by_shard: dict[str, list[str]] = defaultdict(list)
    for k, name in (weight_map or {}).items():
        keys_by_shard[name].append(k)
    for sp in shard_paths:
        example = sorted(keys_by_shard.get(sp.name, []))[:1]
        where = f"; the index places {len(keys_by_shard[sp.name])} key(s) here" if example else ""
        if not sp.exists():
            report.add(sp, example[0] if example else None, f"shard file is missing{where}")
            continue
        try:
            headers[sp.name] = read_header(sp)
        except DsV4Error as err:
            report.add(sp, example[0] if example else None, str(err).removeprefix(f"{sp}: ") + where)
    report.shards = len(shard_paths)

    tensors: dict[str, TensorInfo] = {}
    for sh in headers.values():
        for key, info in sh.tensors.items():
            if key in tensors:
                report.add(sh.path, key, f"also in {tensors[key].file.name}: a key may be in one shard only")
                continue
            tensors[key] = info
    if weight_map is not None:
        for key, name in sorted(weight_map.items()):
            if name not in headers:
                continue  # reported with the shard
            if key not in headers[name].tensors:
                elsewhere = f" (it is in {tensors[key].file.name})" if key in tensors else ""
                report.add(
                    root / name, key, f"{INDEX_NAME} places this key here but the shard lacks it{elsewhere}"
                )
        for key in sorted(tensors.keys() - weight_map.keys()):
            report.add(tensors[key].file, key, f"in the shard but not in {INDEX_NAME}")
    report.tensors = len(tensors)
    report.tensor_bytes = sum(i.nbytes for i in tensors.values())

    config = None
    try:
        config = read_config(root)
    except DsV4Error as err:
        report.add(root / CONFIG_NAME, None, str(err).removeprefix(f"{root / CONFIG_NAME}: "))
    else:
        if config is None and index_path is not None:
            report.add(root / CONFIG_NAME, None, "missing: a checkpoint directory needs its config.json")

    block = _block_size(config)
    _check_siblings(report, tensors, block)
    _check_scale_values(report, tensors, full_scales, sample_size)
    if config is not None:
        # Keys the index places in shards that could not be read still count for the config checks,
        # so that one truncated shard is reported once, not also as missing layers.
        names = set(tensors)
        names.update(k for k, n in (weight_map or {}).items() if n not in headers)
        _check_config(report, root / CONFIG_NAME, config, names)

    info: LayoutInfo = classify_layout(tensors)
    report.layout, report.layout_evidence = info.layout.value, info.evidence
    if info.layout is Layout.RELEASE:
        _check_quant_config(report, root / CONFIG_NAME, config, info)
    elif info.layout is Layout.NVFP4:
        _check_nvfp4_quant_method(report, root / CONFIG_NAME, config, info)
    if expect is not None:
        msg = layout_mismatch(info, expect, step)
        if msg:
            report.add(root, None, msg)
    return _done(report, t0)


def _check_unfinished_run(report: ValidationReport, root: Path) -> None:
    """A folder a dsv4 run is writing, or was writing when it was killed: its journal is not marked
    complete. Its shards may look like a checkpoint (a folder without an index is read as its
    *.safetensors), so say what it is instead of calling part of an output valid."""
    from .journal import JOURNAL_NAME

    path = root / JOURNAL_NAME
    if not path.is_file():
        return
    try:
        journal = json.loads(path.read_text())
    except (OSError, ValueError):
        journal = None
    if not isinstance(journal, dict) or journal.get("complete") is not True:
        report.add(
            path,
            None,
            "an unfinished dsv4 output (its progress journal is not marked complete): a run is writing it "
            "or was stopped; rerun that command with --resume to finish it",
        )


def ensure_valid(path: str | Path, *, expect: Layout | None = None, step: str = "this step", **kw):
    """Validate, raise DsV4Error listing the problems if any, else return the opened Checkpoint."""
    from .reader import Checkpoint

    validate_checkpoint(path, expect=expect, step=step, **kw).raise_if_invalid()
    return Checkpoint.open(path)


def _done(report: ValidationReport, t0: float) -> ValidationReport:
    report.seconds = round(time.perf_counter() - t0, 3)
    return report


def _check_quant_config(
    report: ValidationReport, cfg_path: Path, config: dict | None, info: LayoutInfo
) -> None:
    """The release layout's tensors (FP8 block weights, MXFP4 experts) need a quantization_config that
    says so; vLLM builds its layers from the config, not from the tensors' dtypes, so any other method
    loads them as something they are not."""
    if config is None:
        return  # reported as a missing config.json
    qc = config.get("quantization_config")
    why = f"the tensors are FP8/MXFP4 ({info.evidence}); set it as the release's config.json has it"
    if not isinstance(qc, dict):
        what = "missing" if qc is None else f"{type(qc).__name__} {qc!r}, not an object"
        report.add(cfg_path, "quantization_config", f"{what}: {why}")
        return
    method = qc.get("quant_method")
    if method not in RELEASE_QUANT_METHODS:
        report.add(
            cfg_path,
            "quantization_config.quant_method",
            f"is {method!r}, expected {' or '.join(map(repr, RELEASE_QUANT_METHODS))}: {why}",
        )
    bs = qc.get("weight_block_size")
    if bs is not None and _parse_block_size(bs) is None:
        report.add(
            cfg_path,
            "quantization_config.weight_block_size",
            f"is {bs!r}, expected two positive integers such as [128, 128]",
        )


def _check_nvfp4_quant_method(
    report: ValidationReport, cfg_path: Path, config: dict | None, info: LayoutInfo
) -> None:
    """NVFP4 tensors under another quant_method (bitsandbytes, gptq...): vLLM would build those layers
    and load the NVFP4 bytes into them; convert and use-plugin would carry the wrong block on."""
    qc = (config or {}).get("quantization_config")
    if qc is None:
        return
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method not in NVFP4_QUANT_METHODS:
        report.add(
            cfg_path,
            "quantization_config.quant_method",
            f"is {method!r}, expected one of {', '.join(map(repr, NVFP4_QUANT_METHODS))}: the tensors are "
            f"NVFP4 ({info.evidence}); restore the config.json the export was written with",
        )


def _parse_block_size(bs: object) -> tuple[int, int] | None:
    if isinstance(bs, list) and len(bs) == 2 and all(type(b) is int and b > 0 for b in bs):
        return bs[0], bs[1]
    return None


def _block_size(config: dict | None) -> tuple[int, int]:
    qc = (config or {}).get("quantization_config") or {}
    bs = qc.get("weight_block_size") if isinstance(qc, dict) else None
    if isinstance(bs, list) and len(bs) == 2 and all(isinstance(b, int) and b > 0 for b in bs):
        return bs[0], bs[1]
    return 128, 128


def _expect(report, tensors, key, dtypes, shapes, why, weight_key) -> None:
    """Check that scale ``key`` exists with one of ``dtypes`` and one of ``shapes``."""
    w = tensors[weight_key]
    t = tensors.get(key)
    if t is None:
        report.add(w.file, weight_key, f"{w.dtype} weight {list(w.shape)} has no {key} ({why})")
        return
    if t.dtype not in dtypes:
        report.add(t.file, key, f"dtype {t.dtype}, expected {' or '.join(dtypes)} ({why})")
    if t.shape not in shapes:
        exp = " or ".join(str(list(s)) for s in shapes)
        report.add(
            t.file, key, f"shape {list(t.shape)}, expected {exp} ({why}, for {weight_key} {list(w.shape)})"
        )


def _check_siblings(report: ValidationReport, tensors: dict[str, TensorInfo], block: tuple[int, int]) -> None:
    for key, t in tensors.items():
        if key.endswith(".weight") and t.dtype in ("F8_E4M3", "I8", "U8"):
            stem = key[: -len(".weight")]
            if len(t.shape) < 2:
                report.add(
                    t.file, key, f"quantized {t.dtype} weight must be at least 2-D; got {list(t.shape)}"
                )
                continue
            lead, rows, cols = t.shape[:-2], t.shape[-2], t.shape[-1]
            if t.dtype == "F8_E4M3":
                scale = next((stem + s for s in FP8_SCALE_SUFFIXES if stem + s in tensors), stem + ".scale")
                grid = (*lead, -(-rows // block[0]), -(-cols // block[1]))
                _expect(
                    report,
                    tensors,
                    scale,
                    ("F8_E8M0", "F32"),
                    [grid],
                    f"FP8 block scale, one per {block[0]}x{block[1]} tile",
                    key,
                )
            elif t.dtype == "I8":
                _expect(
                    report,
                    tensors,
                    stem + ".scale",
                    ("F8_E8M0",),
                    [(*lead, rows, cols * 2 // MXFP4_BLOCK)],
                    f"MXFP4 scale, one UE8M0 per {MXFP4_BLOCK} inputs",
                    key,
                )
            else:
                _expect(
                    report,
                    tensors,
                    key + "_scale",
                    ("F8_E4M3",),
                    [(*lead, rows, cols * 2 // NVFP4_BLOCK)],
                    f"NVFP4 block scale, one e4m3 per {NVFP4_BLOCK} inputs",
                    key,
                )
                _expect(
                    report,
                    tensors,
                    key + "_scale_2",
                    ("F32",),
                    [(), (1,)],
                    "NVFP4 global scale, F32 scalar",
                    key,
                )
                if stem + ".input_scale" in tensors:
                    _expect(
                        report,
                        tensors,
                        stem + ".input_scale",
                        ("F32",),
                        [(), (1,)],
                        "NVFP4 input scale, F32 scalar",
                        key,
                    )
        elif _is_block_scale(key, t, tensors):
            suffix = next(s for s in SCALE_SUFFIXES if key.endswith(s))
            stem = key[: -len(suffix)]
            if stem + ".weight" not in tensors:
                report.add(t.file, key, f"scale without its weight {stem}.weight")
            elif suffix in (".scale", ".weight_scale_inv") and tensors[stem + ".weight"].dtype not in (
                "F8_E4M3",
                "I8",
            ):
                w = tensors[stem + ".weight"]
                report.add(
                    t.file, key, f"scale next to a {w.dtype} weight {stem}.weight, which is not quantized"
                )


def _is_block_scale(key: str, t: TensorInfo, tensors: dict[str, TensorInfo]) -> bool:
    """Whether a key is the scale of a quantized weight. transformers' names (dialect H) have a parameter
    called scale of their own: the hyper-connections' ``attn_hc.scale`` / ``ffn_hc.scale``, 1-D F32 with
    no weight beside it. Every block scale is at least 2-D, so a 1-D ``.scale`` without a weight is not one."""
    if not key.endswith(SCALE_SUFFIXES):
        return False
    own_parameter = (
        key.endswith(".scale") and len(t.shape) < 2 and key[: -len(".scale")] + ".weight" not in tensors
    )
    return not own_parameter


def _scale_keys(tensors: dict[str, TensorInfo]) -> list[str]:
    return sorted(k for k, t in tensors.items() if _is_block_scale(k, t, tensors))


def _check_scale_values(report, tensors, full: bool, sample_size: int) -> None:
    keys = _scale_keys(tensors)
    report.scales_total = len(keys)
    if not full and sample_size <= 0:
        keys = []  # headers only
    elif not full and len(keys) > sample_size:
        step = len(keys) / sample_size
        keys = [keys[int(i * step)] for i in range(sample_size)]
    by_file: dict[Path, list[TensorInfo]] = defaultdict(list)
    for k in keys:
        by_file[tensors[k].file].append(tensors[k])
    for path, infos in by_file.items():
        try:
            with path.open("rb") as f:
                for info in sorted(infos, key=lambda i: i.begin):
                    msg = _bad_scale(read_tensor(info, f))
                    report.scales_checked += 1
                    if msg:
                        report.add(path, info.key, msg)
        except (OSError, DsV4Error) as err:
            report.add(path, None, f"cannot read scales: {err}")


def _bad_scale(t: torch.Tensor) -> str | None:
    """Why a scale tensor is not all finite and positive, or None.

    One torch pass over the bytes where the scale is (a step checks every scale it reads, on the GPU
    when it computes there); only a bad tensor is looked at again, on the CPU, to say what is wrong.
    """
    if t.numel() == 0:
        return None
    flat = t.reshape(-1)
    if t.dtype == torch.float8_e8m0fnu:
        bad = flat.view(torch.uint8) == 0xFF
    elif t.dtype == torch.float8_e4m3fn:
        # bytes 0x00 (zero), 0x7F (NaN) and 0x80.. (negative, -0, -NaN) are 0xFF, 0x7E and >= 0x7F
        # after subtracting 1 in uint8 (it wraps): one comparison finds all three
        bad = flat.view(torch.uint8) - 1 >= 0x7E
    else:
        f = flat.float()
        bad = ~((f > 0) & (f < float("inf")))
    return _scale_detail(t.cpu()) if bool(bad.any()) else None


def _scale_detail(t: torch.Tensor) -> str:
    b = t.reshape(-1).view(torch.uint8).numpy() if t.dtype.itemsize == 1 else None
    if t.dtype == torch.float8_e8m0fnu:
        checks = [(b == 0xFF, "NaN (byte 0xFF)")]
    elif t.dtype == torch.float8_e4m3fn:
        m = b & 0x7F
        checks = [(m == 0x7F, "NaN"), (m == 0, "zero"), (b >= 0x80, "negative")]
    else:
        f = t.reshape(-1).float().numpy()
        checks = [(~np.isfinite(f), "not finite"), (f <= 0, "not positive")]
    mask, what = next((mask, what) for mask, what in checks if mask.any())
    return f"scale is {what} at flat index {int(mask.argmax())} ({int(mask.sum())} such value(s))"


def _fp8_nan(t: torch.Tensor) -> str | None:
    """Why an F8_E4M3 weight is unusable (it holds NaN: byte 0x7F or 0xFF), or None. One pass over the
    bytes; a step that reads the weight pays it once (a few percent of reading it from disk)."""
    bad = (t.reshape(-1).view(torch.uint8) | 0x80) == 0xFF
    if not bool(bad.any()):
        return None
    bad = bad.cpu()
    return (
        f"F8_E4M3 weight holds NaN at flat index {int(bad.int().argmax())} ({int(bad.sum())} such value(s))"
    )


def is_block_scale_key(key: str, shape: tuple[int, ...]) -> bool:
    """Whether ``key`` names a quantization scale, from its name and shape alone (no siblings needed):
    a 1-D ``.scale`` is a parameter of its own (the hyper-connections' ``attn_hc.scale``), see
    :func:`_is_block_scale`; every block scale is at least 2-D."""
    return key.endswith(SCALE_SUFFIXES) and not (key.endswith(".scale") and len(shape) < 2)


def value_problem(key: str, t: torch.Tensor) -> str | None:
    """Why a tensor a step has just read holds values no output may carry, or None: a scale that is not
    finite and positive, an F8_E4M3 weight with NaN. Other tensors are not looked at."""
    if is_block_scale_key(key, tuple(t.shape)):
        return _bad_scale(t)
    if t.dtype == torch.float8_e4m3fn:
        return _fp8_nan(t)
    return None


def check_read_values(info: TensorInfo, t: torch.Tensor) -> None:
    """Raise DsV4Error naming ``info``'s file and key if :func:`value_problem` finds one.

    Validation reads a sample of the scales (all with --full-scales); the steps read every one anyway, so
    each is checked where it is read, before anything made from it is written: a bad value in a tensor
    the sample missed stops the step with the file and key instead of a NaN output or a traceback.
    """
    msg = value_problem(info.key, t)
    if msg:
        raise DsV4Error(
            f"{info.file}: key {info.key}: {msg}; the checkpoint is damaged (re-download or re-export it)"
        )


_LAYER_RE = re.compile(r"^(?:model\.)?(layers|mtp)\.(\d+)\.(.+)$")
_EXPERT_RE = re.compile(r"^(?:ffn|mlp)\.experts\.(\d+)\.")
_EXPERT_PREFIXES = ("ffn.experts.", "mlp.experts.")


def _check_config(report: ValidationReport, cfg_path: Path, config: dict, keys: set[str]) -> None:
    blocks: dict[tuple[str, int], set[str]] = defaultdict(set)
    for key in keys:
        m = _LAYER_RE.match(key)
        if m:
            blocks[(m[1], int(m[2]))].add(m[3])
    layers = sorted(n for kind, n in blocks if kind == "layers")
    mtps = sorted(n for kind, n in blocks if kind == "mtp")

    def want_int(name: str) -> int | None:
        v = config.get(name)
        if v is None:
            return None
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            report.add(cfg_path, name, f"expected a non-negative integer; got {v!r}")
            return None
        return v

    n_layers = want_int("num_hidden_layers")
    if n_layers is not None and layers != list(range(n_layers)):
        missing = sorted(set(range(n_layers)) - set(layers))
        extra = sorted(set(layers) - set(range(n_layers)))
        detail = "; ".join(
            s
            for s in (
                f"missing layers.{_ranges(missing)}" if missing else "",
                f"unexpected layers.{_ranges(extra)}" if extra else "",
            )
            if s
        )
        report.add(
            cfg_path,
            "num_hidden_layers",
            f"is {n_layers} but the tensors have {len(layers)} layer(s): {detail}",
        )
    n_mtp = want_int("num_nextn_predict_layers")
    # transformers' DeepseekV4ForCausalLM has no MTP module, so a ModelOpt export (model.-prefixed names)
    # has no mtp.* keys while its config still counts the MTP layers: that is how exports are, not a defect.
    exported = not mtps and any(k.startswith("model.") for k in keys)
    if n_mtp is not None and mtps != list(range(n_mtp)) and not exported:
        report.add(cfg_path, "num_nextn_predict_layers", f"is {n_mtp} but the tensors have mtp blocks {mtps}")

    n_experts = want_int("n_routed_experts")
    if n_experts is not None:
        for (kind, n), names in sorted(blocks.items()):
            ids = {
                int(s.split(".", 3)[2])
                for s in names
                if s.startswith(_EXPERT_PREFIXES) and _EXPERT_RE.match(s)
            }
            if not ids:
                continue
            if ids != set(range(n_experts)):
                missing = sorted(set(range(n_experts)) - ids)
                extra = sorted(ids - set(range(n_experts)))
                first = f"{kind}.{n}.ffn.experts.{(missing or extra)[0]}"
                report.add(
                    cfg_path,
                    "n_routed_experts",
                    f"is {n_experts} but {kind}.{n} has {len(ids)} expert(s)"
                    + (f", missing {_ranges(missing)}" if missing else "")
                    + (f", unexpected {_ranges(extra)}" if extra else "")
                    + f" (e.g. {first})",
                )

    n_hash = want_int("num_hash_layers")
    if n_hash is not None:
        for n in layers:
            names = blocks[("layers", n)]
            if "ffn.gate.weight" not in names:
                continue  # not the native dialect
            has_tid, has_bias = "ffn.gate.tid2eid" in names, "ffn.gate.bias" in names
            key = f"layers.{n}.ffn.gate"
            if n < n_hash and not (has_tid and not has_bias):
                report.add(
                    cfg_path,
                    "num_hash_layers",
                    f"is {n_hash}, so layer {n} is a hash layer and needs {key}.tid2eid and no {key}.bias; "
                    f"found tid2eid={has_tid}, bias={has_bias}",
                )
            if n >= n_hash and not (has_bias and not has_tid):
                report.add(
                    cfg_path,
                    "num_hash_layers",
                    f"is {n_hash}, so layer {n} is not a hash layer and needs {key}.bias and no "
                    f"{key}.tid2eid; found tid2eid={has_tid}, bias={has_bias}",
                )

    ratios = config.get("compress_ratios")
    if ratios is None or n_layers is None:
        return
    if not (isinstance(ratios, list) and all(isinstance(r, int) for r in ratios)):
        report.add(cfg_path, "compress_ratios", f"expected a list of integers; got {ratios!r}")
        return
    n_next = 1 if n_mtp is None else n_mtp
    if len(ratios) != n_layers + n_next:
        report.add(
            cfg_path,
            "compress_ratios",
            f"has {len(ratios)} entries; expected num_hidden_layers + num_nextn_predict_layers = "
            f"{n_layers + n_next} (one per layer, then one per MTP block)",
        )
    targets = [("layers", n) for n in range(n_layers)] + [("mtp", j) for j in range(len(ratios) - n_layers)]
    for i, (r, (kind, n)) in enumerate(zip(ratios, targets, strict=False)):
        names = blocks.get((kind, n))
        if not names or not any(s.startswith("attn.") for s in names):
            continue  # block absent (reported above) or not the native dialect
        has_comp = any(s.startswith("attn.compressor.") for s in names)
        has_idx = any(s.startswith("attn.indexer.") for s in names)
        if has_comp != (r > 1):
            report.add(
                cfg_path,
                f"compress_ratios[{i}]",
                f"is {r}, so {kind}.{n}.attn.compressor.* should be {'present' if r > 1 else 'absent'}, "
                f"but it is {'present' if has_comp else 'absent'}",
            )
        if has_idx != (r == 4):
            report.add(
                cfg_path,
                f"compress_ratios[{i}]",
                f"is {r}, so {kind}.{n}.attn.indexer.* should be {'present' if r == 4 else 'absent'}, "
                f"but it is {'present' if has_idx else 'absent'}",
            )


def _ranges(ns: list[int]) -> str:
    """[0,1,2,5] -> '0-2,5' (and braces when more than one)."""
    parts: list[list[int]] = []
    for n in ns:
        if parts and parts[-1][1] == n - 1:
            parts[-1][1] = n
        else:
            parts.append([n, n])
    text = ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in parts)
    return text if len(ns) == 1 else "{" + text + "}"
