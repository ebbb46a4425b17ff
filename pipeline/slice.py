"""`dsv4 slice`: a small checkpoint cut out of the release, in the release layout, for the node's canary.

The output is the release as it would be had DeepSeek shipped a model with fewer layers and fewer routed
experts: the same names, dtypes and byte encodings, and a config.json that says so. Every later step
(dequant, quantize, convert, serve) runs on it exactly as on the release, so a few minutes on the node
exercise the real kernels on real weights before an eight-hour run.

What is kept:

* Layers. ``layers=N`` keeps N layers chosen to cover the block kinds of the release, in this order of
  priority: hash routing (``ffn.gate.tid2eid``), CSA attention (compress ratio 4: compressor and
  indexer), top-k routing (``ffn.gate.bias``), HCA attention (any other ratio > 1), sliding-only
  attention (ratio <= 1). Of all N-layer choices, the one covering the highest-priority kinds wins
  (each kind outweighs all below it together); among equals, the earliest layers. When the first N
  layers already cover what any N layers can, they are the first N. On V4 Pro, N=2 gives layers 0 and
  4 (hash-routed HCA, top-k CSA); on the micro tiny model, layers 0 and 3. ``layers=(0, 3)`` names
  them instead. Kept layers are renumbered 0..N-1 in their original order, so hash layers (a prefix of
  the release) stay a prefix and ``num_hash_layers`` becomes the number of kept hash layers.
* Routed experts. The first E of every kept layer and of the MTP blocks; the router's
  ``ffn.gate.weight`` keeps its first E rows and ``ffn.gate.bias`` its first E entries, so expert e of
  the slice is expert e of the release, weights, scales, router row and bias alike.
* Everything else (embeddings, head, final norm, hyper-connection head, attention, shared experts,
  norms, the MTP blocks with their projections): byte for byte, FP8 tensors with their UE8M0 scales.

The hash layers' ``ffn.gate.tid2eid`` ([vocab, top_k] expert ids per token) cannot be sliced: most of
its ids name experts that are gone. The rule (``remap_tid2eid``): in each row, an id below E that occurs
first in the row is kept as it is; every other id becomes the first expert, counting up from ``id mod E``
(wrapping), that the row does not hold yet. Why: every id is then a kept expert; each token still picks
top_k *distinct* experts, as the release's table does (a repeated id would give one expert a double
weight, which no release token has); tokens already routed only among the kept experts are unchanged;
and ``mod E`` spreads the rest evenly over the kept experts. Routing does change for every other token
(the report counts them): the slice is a model for kernels and loading, not for accuracy.

config.json is rewritten: ``num_hidden_layers``, ``n_routed_experts``, ``num_hash_layers``,
``compress_ratios`` (the kept layers' entries, then the MTP blocks' unchanged);
``num_nextn_predict_layers`` is kept; ``num_experts_per_tok`` must not exceed E (refused otherwise: the
routing width is part of what the canary tests). ``dsv4-slice-report.json`` records the choice.

Planned from headers, streamed through pipeline.checkpoint's writer (temporary names, renamed when
complete, index last, ``resume`` byte-identical); the source is validated first and the output after.
"""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.checkpoint import (
    CONFIG_NAME,
    INDEX_NAME,
    JOURNAL_NAME,
    Checkpoint,
    Layout,
    OutputPlan,
    PlannedTensor,
    ShardPlan,
    TensorInfo,
    ensure_valid,
    plan_shards,
    read_tensor,
)
from pipeline.checkpoint.validate import check_read_values
from pipeline.errors import DsV4Error, one_line
from pipeline.progress import Progress
from pipeline.provenance import code_digest
from pipeline.release_layout import ROUTED_EXPERT, compress_ratio, release_tensors
from pipeline.step_options import DEFAULT_SHARD_BYTES
from pipeline.streaming_step import Step, StepResult, run_step

STEP = "dsv4 slice"
REPORT_NAME = "dsv4-slice-report.json"
DEFAULT_LAYERS = 2
DEFAULT_EXPERTS = 8

# Block kinds a layer selection tries to cover, highest priority first; weights 16, 8, 4, 2, 1 make any
# kind outweigh all kinds below it together.
KINDS: tuple[str, ...] = ("hash", "csa", "topk", "hca", "sliding")
_WEIGHT = {kind: 1 << (len(KINDS) - 1 - i) for i, kind in enumerate(KINDS)}

_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(.+)$")
_GATE_ROWS = "ffn.gate.weight"
_GATE_BIAS = "ffn.gate.bias"
_TID2EID = "ffn.gate.tid2eid"


# ---- which layers and experts ---------------------------------------------------------------------


def parse_layers(text: str) -> int | tuple[int, ...]:
    """``"2"`` -> 2 (a count); ``"0,3"`` (or ``"5,"`` for one layer) -> (0, 3): layers by number."""
    text = text.strip()
    if "," not in text:
        try:
            count = int(text)
        except ValueError:
            raise DsV4Error(f"--layers {text!r}: a count (e.g. 2) or layer numbers (e.g. 0,3)") from None
        return count
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise DsV4Error(f"--layers {text!r}: layer numbers are integers separated by commas") from None


def layer_kinds(config: Mapping, layer: int) -> frozenset[str]:
    """The kinds of ``layer``: its routing (hash or topk) and its attention (csa, hca or sliding)."""
    routing = "hash" if layer < int(config.get("num_hash_layers", 0)) else "topk"
    ratio = compress_ratio(config, layer)
    attention = "sliding" if ratio <= 1 else "csa" if ratio == 4 else "hca"
    return frozenset((routing, attention))


def _score(config: Mapping, layers: Sequence[int]) -> int:
    covered = set().union(*(layer_kinds(config, n) for n in layers)) if layers else set()
    return sum(_WEIGHT[k] for k in covered)


def select_layers(config: Mapping, layers: int | Sequence[int]) -> tuple[int, ...]:
    """The release layers to keep, ascending (see the module docstring for the rule)."""
    total = int(config["num_hidden_layers"])
    if isinstance(layers, int):
        if not 1 <= layers <= total:
            raise DsV4Error(f"--layers {layers}: the source has {total} layer(s); keep between 1 and {total}")
        # Layers with the same kinds are interchangeable for coverage: only the earliest of each matters.
        first_of: dict[frozenset[str], int] = {}
        for n in range(total):
            first_of.setdefault(layer_kinds(config, n), n)
        candidates = set()
        for r in range(min(layers, len(first_of)) + 1):
            for picks in itertools.combinations(first_of.values(), r):
                fill = [n for n in range(total) if n not in picks][: layers - r]
                candidates.add(tuple(sorted((*picks, *fill))))
        return min(candidates, key=lambda chosen: (-_score(config, chosen), chosen))
    chosen = tuple(int(n) for n in layers)
    if not chosen:
        raise DsV4Error("--layers: name at least one layer")
    bad = [n for n in chosen if not 0 <= n < total]
    if bad:
        raise DsV4Error(
            f"--layers {','.join(map(str, chosen))}: layer(s) {bad} do not exist (0..{total - 1})"
        )
    if len(set(chosen)) != len(chosen):
        raise DsV4Error(f"--layers {','.join(map(str, chosen))}: a layer is named twice")
    return tuple(sorted(chosen))


def sliced_config(config: Mapping, layers: Sequence[int], experts: int) -> dict:
    """config.json of the slice: layer count, expert count, hash layers and compress ratios rewritten."""
    total = int(config["num_hidden_layers"])
    n_experts = int(config["n_routed_experts"])
    top_k = int(config["num_experts_per_tok"])
    if not 1 <= experts <= n_experts:
        raise DsV4Error(
            f"--experts {experts}: the source has {n_experts} routed experts per layer; keep between 1 and "
            f"{n_experts}"
        )
    if experts < top_k:
        raise DsV4Error(
            f"--experts {experts}: each token is routed to num_experts_per_tok = {top_k} experts; keep at "
            f"least {top_k} (the routing width is part of what the slice tests)"
        )
    out = dict(config)
    out["num_hidden_layers"] = len(layers)
    out["n_routed_experts"] = experts
    out["num_hash_layers"] = sum(n < int(config.get("num_hash_layers", 0)) for n in layers)
    ratios = config.get("compress_ratios")
    if ratios is not None:
        out["compress_ratios"] = [ratios[n] for n in layers] + list(ratios[total:])
    for key in ("layer_types", "mlp_layer_types"):  # per-layer lists of transformers-style configs
        value = config.get(key)
        if isinstance(value, list) and len(value) == total:
            out[key] = [value[n] for n in layers]
    return out


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


# ---- the plan --------------------------------------------------------------------------------------


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
    extras = [
        p
        for p in sorted(ckpt.root.iterdir())
        if p.is_file()
        and not p.name.startswith(".")
        and not p.name.endswith((".safetensors", ".partial"))
        and p.name not in (INDEX_NAME, CONFIG_NAME, JOURNAL_NAME, REPORT_NAME)
    ]
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


# ---- the run ---------------------------------------------------------------------------------------


def slice_step(
    src: str | Path,
    *,
    layers: int | Sequence[int] = DEFAULT_LAYERS,
    experts: int = DEFAULT_EXPERTS,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    full_scales: bool = False,
) -> Step:
    """Validate ``src`` (release layout) and plan the slice: the step that
    :func:`pipeline.streaming_step.run_step` runs; it validates the output too."""
    ckpt = ensure_valid(src, expect=Layout.RELEASE, step=STEP, full_scales=full_scales)
    plan = plan_slice(ckpt, layers, experts, max_shard_bytes)

    def producer(meter: Progress):
        def produce(shard: ShardPlan):
            for t in shard.tensors:
                tensor = produce_tensor(plan, t.key)
                meter.advance(plan.sources[t.key].info.nbytes, t.key)
                yield t.key, tensor

        return produce

    kept = ", ".join(f"{new}<-{old}" for new, old in enumerate(plan.layers))
    return Step(
        name="slice",
        plan=plan,
        inputs=[plan.source],
        output=plan.output,
        read_bytes=plan.read_bytes,
        producer=producer,
        headline=f"layers {kept}, {plan.experts} experts; {len(plan.output.weight_map)} tensors",
        counts=Counter(s.action for s in plan.sources.values()),
        files={
            name: json.dumps(obj, indent=2) + "\n"
            for name, obj in ((CONFIG_NAME, plan.config), (REPORT_NAME, plan.report()))
        },
        copies=plan.extra_files,
        check_output=lambda out: ensure_valid(
            out, expect=Layout.RELEASE, step=f"{STEP} (its output)", full_scales=True
        ),
    )


def slice_checkpoint(
    src: str | Path,
    dst: str | Path,
    *,
    layers: int | Sequence[int] = DEFAULT_LAYERS,
    experts: int = DEFAULT_EXPERTS,
    resume: bool = False,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    full_scales: bool = False,
    progress: bool = True,
) -> StepResult:
    """Validate ``src`` (release layout), plan, write the slice to ``dst``, validate it."""
    options = dict(layers=layers, experts=experts, max_shard_bytes=max_shard_bytes, full_scales=full_scales)
    return run_step(
        lambda: slice_step(src, **options), dst, resume=resume, overwrite=overwrite, progress=progress
    )


def dry_run_table(plan: SlicePlan, dst: str | Path) -> str:
    """What a run would write, from headers alone."""
    lines = [f"slice plan: {plan.source} -> {dst}"]
    src_cfg = plan.source_config
    for new, old in enumerate(plan.layers):
        kinds = ", ".join(k for k in KINDS if k in layer_kinds(src_cfg, old))
        lines.append(f"  layers.{new} <- layers.{old} ({kinds})")
    mtp = plan.config.get("num_nextn_predict_layers", 0)
    lines.append(
        f"  experts: the first {plan.experts} of {src_cfg['n_routed_experts']} per layer"
        + (f" and MTP block ({mtp})" if mtp else "")
    )
    for key, n in plan.rerouted.items():
        lines.append(f"  {key}: {n} of {plan.config['vocab_size']} tokens rerouted onto the kept experts")
    lines.append(
        f"  output: {len(plan.output.weight_map)} tensors, {len(plan.output.shards)} shard(s), "
        f"{plan.output.total_bytes / 1e9:.2f} GB"
    )
    return "\n".join(lines)


__all__ = [
    "DEFAULT_EXPERTS",
    "DEFAULT_LAYERS",
    "KINDS",
    "REPORT_NAME",
    "STEP",
    "SlicePlan",
    "dry_run_table",
    "layer_kinds",
    "parse_layers",
    "plan_slice",
    "produce_tensor",
    "remap_tid2eid",
    "select_layers",
    "slice_checkpoint",
    "slice_step",
    "sliced_config",
]
