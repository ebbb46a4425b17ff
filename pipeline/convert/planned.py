"""ConvertPlan: what `dsv4 convert` will write (every output tensor and its job, the config files, what
is left out and why) and the deterministic report it writes beside the output. Built by
pipeline/convert/plan.py from an export, or by pipeline/convert/amax_plan.py from the release and an amax
file."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pipeline import mapping as M
from pipeline.checkpoint import CONFIG_NAME, OutputPlan, PlannedTensor, plan_shards
from pipeline.provenance import code_digest
from pipeline.step_options import DEFAULT_SHARD_BYTES
from pipeline.vllm_config import HF_QUANT_CONFIG

from .constants import REPORT_NAME, STEP
from .jobs import Job

# files of an input (export or release) that the output writes itself instead of copying them; with the
# suffixes never copied. Both plans (plan.py from an export, amax_plan.py from the release) copy by them.
REWRITTEN = (CONFIG_NAME, HF_QUANT_CONFIG, REPORT_NAME)
NOT_COPIED_SUFFIXES = (".safetensors", ".orig", ".partial")


def announce_no_mtp(cfg: dict) -> None:
    """An output without MTP weights must not announce an MTP block (vLLM would build its draft model):
    no next-n layer, and a compress ratio per decoder layer only."""
    cfg["num_nextn_predict_layers"] = 0
    if isinstance(cfg.get("compress_ratios"), list):
        cfg["compress_ratios"] = cfg["compress_ratios"][: cfg["num_hidden_layers"]]


@dataclass
class ConvertPlan:
    export: Path | None  # None: from the release and an amax file
    release: Path | None
    dialect: str
    mapping: M.Plan | None  # the export's key mapping (None without an export)
    layout: dict[str, M.TargetTensor]  # what is written (the target layout, less an absent MTP block)
    jobs: dict[str, Job]  # by name
    job_of: dict[str, str]  # output key -> job name
    dropped: list[tuple[str, str]]  # (export key, why it is not written)
    omitted: list[tuple[str, str]]  # (target key, why the output lacks it)
    config: dict  # the output's config.json
    hf_quant_config: dict | None
    config_changes: list
    extra_files: list[Path]
    max_shard_bytes: int = DEFAULT_SHARD_BYTES
    amax: dict | None = None  # with --amax: what the report says of the amax file (amax_plan.amax_summary)

    @property
    def read_bytes(self) -> int:
        return sum(j.read_bytes for j in self.jobs.values())

    @property
    def has_mtp(self) -> bool:
        return any(k.startswith("mtp.") for k in self.layout)

    def output(self) -> OutputPlan:
        planned = [PlannedTensor(t.key, t.dtype, t.shape) for t in self.layout.values()]
        return plan_shards(planned, max_shard_bytes=self.max_shard_bytes)

    def counts(self) -> Counter[tuple[str, str, str]]:
        """(source, rule, action) -> number of output tensors."""
        out: Counter[tuple[str, str, str]] = Counter()
        for key in self.layout:
            job = self.jobs[self.job_of[key]]
            if self.export is None:
                source = "release" if job.inputs else "amax"
            else:
                source = "release" if job.action in (M.GRAFT, M.TRANSCODE) else "export"
            out[(source, job.rule, job.action)] += 1
        return out

    def report(self) -> dict:
        """The deterministic part of the record written beside the output (no timings, no paths)."""
        dropped_by: Counter[str] = Counter(why for _, why in self.dropped)
        extra = {} if self.amax is None else {"amax": self.amax}
        return {
            "step": STEP,
            "code": code_digest(),
            "dialect": self.dialect,
            "grafted_from_release": self.release is not None,
            "outputs_by_source_rule_action": [
                {"source": s, "rule": r, "action": a, "tensors": n}
                for (s, r, a), n in sorted(self.counts().items())
            ],
            "dropped_export_keys": [{"reason": why, "keys": n} for why, n in sorted(dropped_by.items())],
            "omitted_target_keys": [
                {"reason": why, "keys": n, "example": next(k for k, w in self.omitted if w == why)}
                for why, n in sorted(Counter(why for _, why in self.omitted).items())
            ],
            "num_nextn_predict_layers": self.config.get("num_nextn_predict_layers"),
            "config_changes": [_compact_change(c.to_json()) for c in self.config_changes],
            **extra,
        }


def _compact_change(change: dict, limit: int = 400) -> dict:
    """A config change for the report: values longer than ``limit`` characters of JSON (V4 Pro's
    quantized_layers map lists 71k experts) are summarised by their size; config.json has them whole."""
    out = dict(change)
    for side in ("before", "after"):
        text = json.dumps(out.get(side), sort_keys=True)
        if len(text) > limit:
            out[side] = f"<{len(text)} characters of JSON; see the file>"
    return out


__all__ = ["ConvertPlan"]
