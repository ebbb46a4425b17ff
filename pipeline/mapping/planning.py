"""Planning a whole checkpoint: map every (key, dtype, shape), check that the result writes each key of
the target layout exactly once with the right shape, and list what an export cannot have
(:data:`EXPORT_LACKS`) in :attr:`Plan.absent`."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from collections.abc import Mapping as MappingABC
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import one_line

from .actions import (
    BF16_TO_FP8,
    BF16_TO_NVFP4,
    CAST,
    COPY,
    KEEP_NVFP4,
    NVFP4_TO_BF16,
    NVFP4_TO_FP8,
    UNIFY_W13,
)
from .dialects import detect_dialect
from .errors import MappingError
from .keys import Mapping, map_key
from .target import TargetTensor, _base, target_layout


# Target keys an H/X export cannot have, with why; plan() lists them in Plan.absent instead of failing.
@dataclass(frozen=True)
class Lack:
    """Target keys an export of ``dialects`` may lack: ``plan`` lists them in Plan.absent with ``why``.
    ``with_mtp``: the entry applies when the export does (True) or does not (False) carry the MTP block."""

    pattern: str  # fullmatched against the target key
    dialects: tuple[str, ...]
    why: str
    with_mtp: bool = False


EXPORT_LACKS: tuple[Lack, ...] = (
    Lack(
        r"mtp\.\d+\.ffn\.experts\.\d+\.w[123]\.input_scale",
        ("X",),
        "no calibration reaches the MTP block (hf_ptq re-attaches it unquantized), so no activation scale: "
        "dsv4 convert gives the fallback (the largest calibrated one of the same projection)",
        with_mtp=True,
    ),
    Lack(
        r"mtp\.\d+\..+",
        ("H", "X"),
        "transformers' DeepseekV4ForCausalLM has no MTP module (mtp.* is in "
        "_keys_to_ignore_on_load_unexpected), so ModelOpt exports carry none: take them from the "
        "release (--graft-from) or serve without the MTP draft",
    ),
)


@dataclass
class Plan:
    dialect: str
    mappings: list[Mapping]
    absent: list[tuple[str, str]] = field(default_factory=list)  # (target key, why the input lacks it)
    layout: dict[str, TargetTensor] = field(default_factory=dict)  # target_layout(config), as planned against

    def counts(self) -> Counter[tuple[str, str]]:
        """(rule, action) -> number of source keys."""
        return Counter((m.rule, m.action or "?") for m in self.mappings)


def _expected_source_shape(m: Mapping, spec: TargetTensor) -> tuple[int, ...] | None:
    """The shape a source tensor must have for its action, or None where it is not determined."""
    if m.action in (COPY, CAST, KEEP_NVFP4, UNIFY_W13, BF16_TO_FP8):
        if m.action == BF16_TO_FP8 or m.target == spec.key:
            return spec.shape
        return None
    if m.action in (NVFP4_TO_FP8, NVFP4_TO_BF16) and m.writes:
        rows, cols = spec.shape
        return (rows, cols // 2)
    if m.action == BF16_TO_NVFP4:
        rows, packed = spec.shape  # the target's packed weight
        return (rows, packed * 2)
    return None


def _as_triple(t: Any) -> tuple[str, str, tuple[int, ...]]:
    if isinstance(t, tuple | list):
        key, dtype, shape = t
    else:
        key, dtype, shape = t.key, t.dtype, t.shape
    return key, dtype, tuple(shape)


def plan(tensors: Iterable[Any], config: MappingABC, dialect: str | None = None) -> Plan:
    """Map every (key, dtype, shape) (tuples or objects with .key/.dtype/.shape) and check the result
    writes each key of ``target_layout(config)`` exactly once with the right shape; MappingError
    listing every problem (unmapped keys, duplicates, missing keys, wrong shapes) otherwise."""
    triples = [_as_triple(t) for t in tensors]
    if dialect is None:
        dialect = detect_dialect(k for k, _, _ in triples)
    layout = target_layout(config)
    problems: list[str] = []
    mappings: list[Mapping] = []
    for key, dtype, shape in triples:
        try:
            mappings.append(map_key(key, dialect, dtype, shape))
        except MappingError as exc:
            problems.append(str(exc))
    writers: dict[str, list[str]] = defaultdict(list)
    for m in mappings:
        for w in m.writes:
            writers[w].append(m.source)
        spec = layout.get(m.target) or layout.get(_base(m.target) + ".weight")
        for w in m.writes:
            if w not in layout:
                problems.append(f"{m.source}: writes {w}, which this config's layout does not have")
        if spec is not None and m.action in (COPY, KEEP_NVFP4, UNIFY_W13) and m.dtype != spec.dtype:
            problems.append(f"{m.source}: {m.dtype}, but {m.action} into {spec.key} needs {spec.dtype}")
        if spec is not None and m.shape is not None:
            want = _expected_source_shape(m, spec)
            if want is not None and want != m.shape:
                problems.append(
                    f"{m.source}: shape {list(m.shape)} but {m.action} into {spec.key} {list(spec.shape)} "
                    f"needs {list(want)}"
                )
    # an NVFP4 weight is converted from three tensors: its block and global scales must be there
    present = {m.source for m in mappings}
    for m in mappings:
        if m.action in (NVFP4_TO_FP8, NVFP4_TO_BF16) and m.writes:
            base = _base(m.source)
            lacking = [base + s for s in (".weight_scale", ".weight_scale_2") if base + s not in present]
            if lacking:
                problems.append(f"{m.source}: {m.action} needs {', '.join(lacking)}, which the input lacks")
    for w, sources in writers.items():
        if len(sources) > 1:
            problems.append(f"{w}: written by {len(sources)} source keys: {', '.join(sorted(sources))}")
    absent: list[tuple[str, str]] = []
    missing: list[str] = []
    has_mtp = any(w.startswith("mtp.") for w in writers)
    for key in layout:
        if key in writers:
            continue
        why = next(
            (
                lack.why
                for lack in EXPORT_LACKS
                if dialect in lack.dialects and lack.with_mtp == has_mtp and re.fullmatch(lack.pattern, key)
            ),
            None,
        )
        if why is None:
            missing.append(key)
        else:
            absent.append((key, why))
    if missing:
        shown = ", ".join(missing[:20]) + (f", ... ({len(missing)} in all)" if len(missing) > 20 else "")
        problems.append(f"{len(missing)} target key(s) no source key writes: {shown}")
    if problems:
        raise MappingError(
            f"cannot plan the conversion of {len(triples)} dialect-{dialect} tensors: "
            + one_line(problems, show=len(problems))
        )
    return Plan(dialect, mappings, absent, layout)
