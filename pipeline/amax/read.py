"""Reading an amax file: ours (one safetensors keyed by ModelOpt quantizer names, as ``dsv4 quantize``
snapshots it in ``<export>.calibration/amax.safetensors`` and ``dsv4 calibrate`` writes it) or NVIDIA's
ptq.py dumps (``amax_dict_rank{r}-mp{mp}.pt``, one per model-parallel rank). Both come back as the same
list of :class:`Entry` (file, key, value); nothing here knows release modules (pipeline/amax/names.py
does) or rules (pipeline/amax/table.py).

Every problem names its file and key, and every file is read and checked before anything is written.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.errors import DsV4Error, one_line
from pipeline.quantize_checks import REPORT_NAME as QUANTIZE_REPORT  # beside amax.safetensors

DSV4, NVIDIA = "dsv4", "nvidia"  # the two formats
NVIDIA_FILE = re.compile(r"amax_dict_rank(?P<rank>\d+)-mp(?P<mp>\d+)\.pt")
# dsv4 calibrate's header metadata: one JSON document under this key (its versions among it)
CALIBRATE_METADATA_KEY = "dsv4_calibrate"


@dataclass(frozen=True)
class Entry:
    file: Path
    key: str
    value: float  # a float32 value, held exactly in a Python float

    @property
    def where(self) -> str:
        return f"{self.file}: key {self.key}"


@dataclass(frozen=True)
class AmaxFile:
    """What was read: the entries, the format, and the ModelOpt that calibrated them where known."""

    path: Path  # as given: the safetensors file, or NVIDIA's folder
    format: str
    files: tuple[Path, ...]  # every file read (the step fingerprints them for --resume)
    entries: tuple[Entry, ...]
    modelopt_version: str | None


def read_amax(path: str | Path) -> AmaxFile:
    """Our safetensors file, or a folder (or one file) of NVIDIA's ``amax_dict_rank*-mp*.pt``."""
    path = Path(path)
    if not path.exists():
        raise DsV4Error(f"{path}: no such amax file or folder")
    if path.is_dir() or NVIDIA_FILE.fullmatch(path.name):
        return _read_nvidia(path if path.is_dir() else path.parent)
    if not path.is_file():
        raise DsV4Error(f"{path}: not a regular file (an amax file is a .safetensors file)")
    return _read_dsv4(path)


def _checked_value(file: Path, key: str, t: object) -> float:
    """A 0-d float32 tensor's value; DsV4Error naming file and key otherwise."""
    if not isinstance(t, torch.Tensor):
        raise DsV4Error(f"{file}: key {key}: a {type(t).__name__}, not a tensor")
    if t.dtype != torch.float32 or t.dim() != 0:
        raise DsV4Error(
            f"{file}: key {key}: {str(t.dtype).removeprefix('torch.')} {list(t.shape)}, but a per-tensor "
            "NVFP4 amax is a 0-d float32 (a per-channel or per-block amax is not what this converter reads)"
        )
    return float(t)


def _read_dsv4(path: Path) -> AmaxFile:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
            meta = f.metadata() or {}
            entries = tuple(Entry(path, k, _checked_value(path, k, f.get_tensor(k))) for k in keys)
    except (SafetensorError, OSError) as err:
        raise DsV4Error(f"{path}: not a readable safetensors amax file ({err})") from None
    if not entries:
        raise DsV4Error(f"{path}: holds no amax")
    return AmaxFile(path, DSV4, (path,), entries, _calibrate_version(meta) or _quantize_report_version(path))


def _calibrate_version(meta: dict[str, str]) -> str | None:
    """The ModelOpt version that calibrated a ``dsv4 calibrate`` AMAX file, from its header metadata."""
    try:
        versions = json.loads(meta[CALIBRATE_METADATA_KEY]).get("versions") or {}
    except (KeyError, ValueError, AttributeError):
        return None
    v = versions.get("nvidia-modelopt") if isinstance(versions, dict) else None
    return v if isinstance(v, str) else None


def _quantize_report_version(path: Path) -> str | None:
    """The ModelOpt version that calibrated a ``dsv4 quantize`` snapshot, from the report beside it."""
    report = path.with_name(QUANTIZE_REPORT)
    try:
        versions = json.loads(report.read_text()).get("versions") or {}
    except (OSError, ValueError, AttributeError):
        return None
    v = versions.get("nvidia-modelopt") if isinstance(versions, dict) else None
    return v if isinstance(v, str) else None


def _read_nvidia(folder: Path) -> AmaxFile:
    """Every rank's dump, merged as a disjoint union (each rank holds its own experts); all files must
    say the same model-parallel size and every rank of it must be there."""
    files = sorted(p for p in folder.iterdir() if NVIDIA_FILE.fullmatch(p.name))
    if not files:
        raise DsV4Error(f"{folder}: no amax_dict_rank<r>-mp<mp>.pt files (NVIDIA ptq.py's amax dumps)")
    ranks: dict[int, Path] = {}
    sizes = set()
    for p in files:
        m = NVIDIA_FILE.fullmatch(p.name)
        assert m is not None
        ranks[int(m["rank"])] = p
        sizes.add(int(m["mp"]))
    if len(sizes) != 1:
        raise DsV4Error(
            f"{folder}: amax dumps of different model-parallel sizes ({', '.join(f'mp{s}' for s in sorted(sizes))}): "
            "files of more than one ptq.py run; keep one run's files"
        )
    mp = sizes.pop()
    lacking = [r for r in range(mp) if r not in ranks]
    extra = [r for r in ranks if r >= mp]
    if lacking or extra:
        raise DsV4Error(
            f"{folder}: a ptq.py run with mp{mp} writes ranks 0..{mp - 1}; "
            + (f"rank(s) {lacking} missing" if lacking else f"rank(s) {extra} out of range")
        )
    seen: dict[str, Path] = {}
    entries: list[Entry] = []
    problems: list[str] = []
    for r in range(mp):
        p = ranks[r]
        try:
            data = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for a damaged or hostile pickle
            raise DsV4Error(f"{p}: not a readable torch amax dump ({type(err).__name__}: {err})") from None
        if not isinstance(data, dict):
            raise DsV4Error(f"{p}: a {type(data).__name__}, not a dict of amax tensors")
        for key, t in data.items():
            if not isinstance(key, str):
                raise DsV4Error(f"{p}: key {key!r} is not a string")
            if key in seen:
                problems.append(f"{p}: key {key}: also in {seen[key]} (ranks hold disjoint experts)")
                continue
            seen[key] = p
            entries.append(Entry(p, key, _checked_value(p, key, t)))
    if problems:
        raise DsV4Error(f"{folder}: the rank files overlap: {one_line(problems)}")
    if not entries:
        raise DsV4Error(f"{folder}: the amax dumps hold no amax")
    return AmaxFile(folder, NVIDIA, tuple(ranks[r] for r in range(mp)), tuple(entries), None)


def is_usable(value: float) -> bool:
    """An amax a scale can be made from: finite and positive (0 means the quantizer saw nothing)."""
    return math.isfinite(value) and value > 0


__all__ = ["DSV4", "NVIDIA", "NVIDIA_FILE", "AmaxFile", "Entry", "is_usable", "read_amax"]
