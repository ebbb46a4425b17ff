"""`dsv4 convert` on a stream: (name, tensor) pairs of a ModelOpt export in, the converted layout out.

A loader (the vLLM plugin, ``patches/vllm_plugin.py``) reads an export tensor by tensor and needs, tensor
by tensor, what ``dsv4 convert`` would have written: the release's names (dialect N), FP8 block
attention with UE8M0 ``.scale`` tiles, plain tensors in the release's dtypes, routed experts as
ModelOpt NVFP4. :class:`StreamConverter` gives exactly that, byte for byte (checked against
``convert_checkpoint`` by tests/plugin/test_vllm_plugin.py), because it decides nothing itself:

* every name goes through :func:`pipeline.mapping.map_key`, the one table (rename rule + action);
* every action runs through :data:`pipeline.convert.runners.RUNNERS` with a :class:`pipeline.convert.jobs.Job`
  shaped as ``plan_convert`` shapes it (same inputs in the same order, same params).

What a stream adds is order. Some jobs read several export tensors: an NVFP4 weight that becomes FP8 or
BF16 needs its ``.weight_scale`` and ``.weight_scale_2``; giving an expert's w1 and w3 one global scale
(``unify-w13-global-scale``) needs both block scales, both global scales and, to measure the error it
adds, both packed weights. Those inputs are held until the job has all of them, then the job runs, its
outputs are yielded and its inputs released: memory is bounded by what is pending (in an export's file
order, one module's tensors). Everything else goes out as it comes in.

The dialect (H, X or N) is found from the keys as they come: the candidates are the dialects whose rules
mapped every key so far; a key none of them maps is :class:`pipeline.mapping.UnmappedKeyError`, naming the
key and the nearest rule. A key whose outputs this config's layout has no place for, or whose dtype or
shape the planned action cannot take, is a :class:`StreamConvertError` naming it.

:meth:`StreamConverter.finish` (run by :meth:`StreamConverter.convert` when the input ends) checks:

* no job is still waiting for an input (names the export keys that arrived and what is missing);
* every tensor of the target layout went out once, except whole routed experts that never arrived
  (vLLM's expert-parallel weight filter skips non-local experts by name before reading them; ``dsv4
  use-plugin`` checked the export holds every expert) and an absent ``mtp.*`` block (the main model
  drops it; transformers exports have none).

Without ``--graft-from``'s release there is no MTP block, as ``dsv4 convert`` without it.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch

from pipeline import mapping as M
from pipeline.checkpoint import TensorInfo, from_torch
from pipeline.checkpoint.validate import value_problem
from pipeline.errors import DsV4Error
from pipeline.release_layout import ROUTED_EXPERT
from pipeline.vllm_config import layout_config

from .constants import _EXPERT_SIBLING
from .jobs import Job
from .runners import RUNNERS, RunStats

_NVFP4_PARTS = (".weight", ".weight_scale", ".weight_scale_2")  # the runner's input order
# slots of an expert's unify job, after its module's release name (layers.N.ffn.experts.E)
_UNIFY_SCALES = (".w1.weight_scale", ".w1.weight_scale_2", ".w3.weight_scale", ".w3.weight_scale_2")
_UNIFY_WEIGHTS = (".w1.weight", ".w3.weight")


class StreamConvertError(DsV4Error):
    """A stream that cannot be converted; the message names the export key."""


class _TensorFile:
    """An in-memory stand-in for a shard file, so that a TensorInfo can point at a tensor already read.

    Only for the unify job's params: ``pipeline.convert.runners._run_unify`` reads the w1/w3 packed weights
    itself (``read_tensor(job.params[i])``) to measure the error it adds, and only when the two global
    scales differ. The bytes are copied then, not before."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def open(self, mode: str = "rb") -> io.BytesIO:
        return io.BytesIO(self.tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())


def _info_in_memory(key: str, tensor: torch.Tensor) -> TensorInfo:
    nbytes = tensor.numel() * tensor.element_size()
    return TensorInfo(key, from_torch(tensor.dtype), tuple(tensor.shape), _TensorFile(tensor), 0, nbytes)


def _part(source: str) -> tuple[str, str]:
    """(module, suffix) of an NVFP4 tensor's export key: suffix one of _NVFP4_PARTS."""
    for suffix in (".weight_scale_2", ".weight_scale", ".weight"):
        if source.endswith(suffix):
            return source[: -len(suffix)], suffix
    raise AssertionError(f"{source}: not an NVFP4 weight or scale")  # map_key decided it was


@dataclass
class _Waiting:
    """A job that reads several export tensors, with those that have arrived."""

    action: str
    prefix: str  # what the slots follow: the export's module name, or (unify) the expert's release name
    need: tuple[str, ...]  # input slots, in the runner's order (then params, for unify)
    have: dict[str, torch.Tensor] = field(default_factory=dict)
    mapping: dict[str, M.Mapping] = field(default_factory=dict)  # slot -> the export key's mapping

    @property
    def missing(self) -> list[str]:
        return [self.prefix + s for s in self.need if s not in self.have]


@dataclass
class StreamSummary:
    """What one stream did."""

    dialect: str | None
    inputs: int
    outputs: int
    dropped: Counter[str]  # reason -> export keys not passed on
    stats: RunStats
    skipped_experts: int  # routed experts of the layout that never arrived (expert-parallel filter)

    def describe(self) -> str:
        lines = [
            f"{self.inputs} export tensors (dialect {self.dialect}) -> {self.outputs} tensors in the "
            f"release layout; {sum(self.dropped.values())} dropped"
        ]
        lines += [f"  dropped {n}: {why}" for why, n in sorted(self.dropped.items())]
        if self.skipped_experts:
            lines.append(f"  {self.skipped_experts} routed expert(s) never arrived (expert-parallel filter)")
        u = self.stats.unify
        if u.experts:
            lines.append(
                f"  w1/w3 global scales: {u.changed} of {u.experts} experts differed and were unified "
                f"(added relative weight error {u.rel_error:.3g}, at most {u.max_rel_error:.3g} per tensor)"
                if u.changed
                else f"  w1/w3 global scales: equal in all {u.experts} experts"
            )
        return "\n".join(lines)


class StreamConverter:
    """Convert one stream of export tensors (module docstring). One instance per stream.

    ``config``: the export's config.json (any vLLM target's fields: ``layout_config`` restores the
    release's); it decides the target layout. ``dialect``: H, X or N, or None to find it from the keys.
    ``device``: where the actions compute (``pipeline.device.resolve_device``); outputs come back to
    the CPU, as ``pipeline.convert.runners.run_job`` brings them back for the writer."""

    def __init__(
        self, config: Mapping, *, dialect: str | None = None, device: torch.device | str = "cpu"
    ) -> None:
        if dialect is not None and dialect not in M.DIALECTS:
            raise StreamConvertError(f"unknown dialect {dialect!r}; known: {', '.join(M.DIALECTS)}")
        self.layout = M.target_layout(layout_config(dict(config)))
        self.device = torch.device(device)
        self.stats = RunStats()
        self._candidates = [dialect] if dialect is not None else list(M.DIALECTS)
        self._waiting: dict[str, _Waiting] = {}
        self._emitted: set[str] = set()
        self._seen_experts: set[str] = set()  # routed expert modules (target names) that arrived
        self._dropped: Counter[str] = Counter()
        self._inputs = 0
        self._finished = False
        self.summary: StreamSummary | None = None

    # ---- mapping one key ----------------------------------------------------------------------------

    @property
    def dialect(self) -> str | None:
        """The dialect, once the keys so far fit exactly one."""
        return self._candidates[0] if len(self._candidates) == 1 else None

    def _map(self, name: str, tensor: torch.Tensor) -> M.Mapping:
        dtype, shape = from_torch(tensor.dtype), tuple(tensor.shape)
        found: dict[str, M.Mapping] = {}
        errors: list[M.MappingError] = []
        for d in self._candidates:
            try:
                found[d] = M.map_key(name, d, dtype, shape)
            except M.MappingError as exc:
                errors.append(exc)
        if not found:
            other = [e for e in errors if not isinstance(e, M.UnmappedKeyError)]
            if other:  # a rule renamed it, but no action takes it: say that, naming the export key
                raise StreamConvertError(f"{name}: {other[0]}") from other[0]
            if len(errors) == 1:
                raise errors[0]
            raise M.UnmappedKeyError(  # every candidate dialect's own reason (and nearest rule)
                name,
                "/".join(self._candidates),
                f"{name}: no rule of dialect {' or '.join(self._candidates)} maps this key: "
                + "; ".join(f"{e.dialect}: {str(e).removeprefix(name + ': ')}" for e in errors),
                errors[-1].nearest,
            )
        outcomes = {(m.target, m.action, m.writes) for m in found.values()}
        if len(outcomes) > 1:  # pragma: no cover - dialects share a key only through shared rules
            raise StreamConvertError(f"{name}: dialects {', '.join(found)} map it differently: {outcomes}")
        self._candidates = [d for d in self._candidates if d in found]
        m = next(iter(found.values()))
        self._check(m)
        return m

    def _check(self, m: M.Mapping) -> None:
        """What ``mapping.plan`` checks per key, against this config's layout."""
        for w in m.writes:
            if w not in self.layout:
                raise StreamConvertError(
                    f"{m.source}: rule {m.rule} writes {w}, which this config's layout does not have "
                    "(a checkpoint of another model?)"
                )
        spec = self.layout.get(m.target) or self.layout.get(M._base(m.target) + ".weight")
        if spec is None:
            if m.action == M.DROP:
                return
            raise StreamConvertError(f"{m.source}: {m.target} is not in this config's layout")
        if m.action in (M.COPY, M.KEEP_NVFP4, M.UNIFY_W13) and m.dtype != spec.dtype:
            raise StreamConvertError(
                f"{m.source}: {m.dtype}, but {m.action} into {spec.key} needs {spec.dtype}"
            )
        want = M._expected_source_shape(m, spec)
        if want is not None and m.shape is not None and want != m.shape:
            raise StreamConvertError(
                f"{m.source}: shape {list(m.shape)} but {m.action} into {spec.key} {list(spec.shape)} "
                f"needs {list(want)}"
            )

    # ---- running jobs -----------------------------------------------------------------------------

    def _run(self, job: Job, tensors: list[torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        try:
            out = RUNNERS[job.action](job, tensors, self.device, self.stats)
        except ValueError as err:  # a value the action cannot take (a NaN BF16 weight, an overflow)
            raise StreamConvertError(f"{job.name}: cannot {job.action}: {err}") from err
        if len(out) != len(job.outputs):  # pragma: no cover - a bug in a runner
            raise AssertionError(f"{job.name}: {len(out)} tensors for {len(job.outputs)} outputs")
        for key, t in zip(job.outputs, out, strict=True):
            if key in self._emitted:
                raise StreamConvertError(f"{key}: written twice (second time by export key {job.name})")
            self._emitted.add(key)
            yield key, t.cpu()  # as run_job hands the writer: what a loader gets from a checkpoint

    def _wait(
        self, action: str, prefix: str, need: tuple[str, ...], slot: str, m: M.Mapping, t: torch.Tensor
    ):
        job_id = f"{action}:{prefix}"
        w = self._waiting.setdefault(job_id, _Waiting(action, prefix, need))
        if slot in w.have:
            raise StreamConvertError(f"{m.source}: arrived twice ({job_id} already has it)")
        w.have[slot], w.mapping[slot] = t, m
        if w.missing:
            return None
        return self._waiting.pop(job_id)

    def feed(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """Take one export tensor; yield the converted tensors that are complete now (maybe none)."""
        if self._finished:
            raise StreamConvertError(f"{name}: the stream was already finished")
        self._inputs += 1
        m = self._map(name, tensor)
        problem = value_problem(name, tensor)  # as dsv4 convert checks every scale and FP8 weight it reads
        if problem:
            raise StreamConvertError(f"{name}: {problem}; the export is damaged (re-export it)")
        sib = _EXPERT_SIBLING.match(m.target)
        if sib is not None and ROUTED_EXPERT.match(sib["module"]):
            self._seen_experts.add(sib["module"].rsplit(".", 1)[0])
        if m.action == M.DROP:
            self._dropped[m.reason.rsplit(" | ", 1)[-1]] += 1
            return
        if m.action in (M.NVFP4_TO_FP8, M.NVFP4_TO_BF16):
            module, suffix = _part(m.source)
            done = self._wait(m.action, module, _NVFP4_PARTS, suffix, m, tensor)
            if done is not None:
                weight = done.mapping[".weight"]
                job = Job(weight.source, m.action, weight.rule, weight.writes, ())
                yield from self._run(job, [done.have[s] for s in _NVFP4_PARTS])
            return
        if m.action == M.UNIFY_W13:
            assert sib is not None, m
            yield from self._unify(sib, m, tensor)
            return
        params: tuple = (self.layout[m.target].dtype,) if m.action == M.CAST else ()
        yield from self._run(Job(m.source, m.action, m.rule, m.writes, (), params), [tensor])
        if (
            m.action == M.KEEP_NVFP4
            and sib is not None
            and sib["part"] == "weight"
            and sib["module"].endswith((".w1", ".w3"))
        ):  # an expert's w1/w3 packed weight: the unify job measures the error it adds on them
            yield from self._unify(sib, m, tensor)

    def _unify(self, sib, m: M.Mapping, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        expert, w = sib["module"].rsplit(".", 1)
        slot = f".{w}.{sib['part']}"
        done = self._wait(M.UNIFY_W13, expert, _UNIFY_SCALES + _UNIFY_WEIGHTS, slot, m, tensor)
        if done is None:
            return
        first = done.mapping[_UNIFY_SCALES[0]]
        params = tuple(_info_in_memory(done.mapping[s].source, done.have[s]) for s in _UNIFY_WEIGHTS)
        outputs = tuple(done.mapping[s].target for s in _UNIFY_SCALES)
        job = Job(f"unify:{expert}", M.UNIFY_W13, first.rule, outputs, (), params)
        yield from self._run(job, [done.have[s] for s in _UNIFY_SCALES])

    # ---- the whole stream -------------------------------------------------------------------------

    def convert(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Every converted tensor of ``weights``; :meth:`finish` runs when they end."""
        for name, tensor in weights:
            yield from self.feed(name, tensor)
        self.finish()

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def pending(self) -> int:
        """How many jobs hold inputs while waiting for the rest (what the memory bound is)."""
        return len(self._waiting)

    def finish(self) -> StreamSummary:
        """Check the stream was complete (module docstring); StreamConvertError naming a key otherwise.
        The result is also kept as :attr:`summary`."""
        self._finished = True
        if self._waiting:
            lines = []
            for job_id, w in list(self._waiting.items())[:5]:
                arrived = ", ".join(m.source for m in w.mapping.values())
                lines.append(f"{arrived}: its job {job_id} never got {', '.join(w.missing)}")
            # (the missing inputs of a unify job are named by their release names: which export key
            # would have carried one depends on the dialect)
            raise StreamConvertError(
                f"the export ended with {len(self._waiting)} job(s) still waiting for an input: "
                + "; ".join(lines)
            )
        skipped: set[str] = set()
        missing: list[str] = []
        for key, spec in self.layout.items():
            if key in self._emitted or key.startswith("mtp."):
                continue
            me = ROUTED_EXPERT.match(spec.weight)
            if me is not None and spec.weight.rsplit(".", 1)[0] not in self._seen_experts:
                skipped.add(spec.weight.rsplit(".", 1)[0])
                continue
            missing.append(key)
        if missing:
            shown = ", ".join(missing[:5]) + (f", ... ({len(missing)} in all)" if len(missing) > 5 else "")
            raise StreamConvertError(
                f"the export ended without a source for {len(missing)} tensor(s) of the converted layout: "
                f"{shown}"
            )
        mtp = [k for k in self.layout if k.startswith("mtp.")]
        if mtp and any(k in self._emitted for k in mtp) and not all(k in self._emitted for k in mtp):
            first = next(k for k in mtp if k not in self._emitted)
            raise StreamConvertError(f"the MTP block arrived incomplete: no source for {first}")
        self.summary = StreamSummary(
            self.dialect, self._inputs, len(self._emitted), self._dropped, self.stats, len(skipped)
        )
        return self.summary


__all__ = ["StreamConvertError", "StreamConverter", "StreamSummary"]
