"""The plan of `dsv4 convert RELEASE DST --amax AMAX`: the layout vLLM loads, from the release's headers
and an amax file alone.

It writes what today's path (``dsv4 dequant`` -> ``dsv4 quantize`` -> ``dsv4 convert``) writes, byte for
byte: the same tensors (pipeline/convert/amax_jobs.py), and the same config.json, which today's path
builds from the config transformers saved into the export: here transformers' save is reproduced from the
release config (pipeline.mapping.transformers_config) and goes through the same fix-config rules. What
the export's hf_quant_config.json gave the rewrite (ModelOpt's producer entry, no KV-cache
quantization) comes from the amax file's record of the ModelOpt that calibrated it.
"""

from __future__ import annotations

from pathlib import Path

from pipeline import mapping as M
from pipeline.amax import AmaxTable, load_table
from pipeline.checkpoint import CONFIG_NAME, Checkpoint, Layout, ensure_valid
from pipeline.checkpoint.folder import files_to_copy
from pipeline.errors import DsV4Error
from pipeline.mapping.transformers_config import transformers_saved_config
from pipeline.step_options import DEFAULT_SHARD_BYTES
from pipeline.vllm_config import FixResult, fix_config, layout_config

from .amax_jobs import add_amax_jobs, amax_layout, check_coverage
from .constants import AMAX_EXPERT_SOURCES, AMAX_RECIPES, STEP
from .jobs import JobTable
from .planned import NOT_COPIED_SUFFIXES, REWRITTEN, ConvertPlan, announce_no_mtp


def plan_from_release(
    release_dir: str | Path,
    amax_path: str | Path,
    *,
    recipe: str,
    experts: str,
    target_vllm: str,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    full_scales: bool = False,
    scale_sample: int | None = None,
) -> ConvertPlan:
    """Validate the release and the amax file, resolve the amax table, and plan every output tensor."""
    if recipe not in AMAX_RECIPES:
        raise DsV4Error(f"{STEP}: --recipe must be one of {', '.join(AMAX_RECIPES)}; got {recipe!r}")
    if experts not in AMAX_EXPERT_SOURCES:
        raise DsV4Error(
            f"{STEP}: with --amax, --experts must be one of {', '.join(AMAX_EXPERT_SOURCES)}; got {experts!r}"
        )
    check = {"full_scales": full_scales} | ({} if scale_sample is None else {"sample_size": scale_sample})
    release = ensure_valid(release_dir, expect=Layout.RELEASE, step=f"{STEP} --amax", **check)
    if release.config is None:
        raise DsV4Error(f"{release.root}: no config.json; {STEP} --amax needs the release's config")
    where = str(release.root / CONFIG_NAME)
    layout_cfg = layout_config(release.config, where=where)
    amax = load_table(amax_path, int(layout_cfg["n_routed_experts"]))
    layout, omitted = amax_layout(M.target_layout(layout_cfg), recipe)
    ignored = check_coverage(amax, layout, recipe, experts)

    table = JobTable()
    add_amax_jobs(table, release, layout, amax, recipe, experts)
    jobs = table.writing()
    fixed = _output_config(release, amax, layout, recipe, target_vllm)
    return ConvertPlan(
        export=None,
        release=release.root,
        dialect="N",
        mapping=None,
        layout=layout,
        jobs=jobs,
        job_of={k: table.job_of[k] for k in layout},
        dropped=[],
        omitted=omitted,
        config=fixed.config,
        hf_quant_config=fixed.hf_quant_config,
        config_changes=list(fixed.changes),
        extra_files=files_to_copy(release.root, rewritten=REWRITTEN, skip_suffixes=NOT_COPIED_SUFFIXES),
        max_shard_bytes=max_shard_bytes,
        amax=amax_summary(amax, recipe, experts, ignored),
    )


def amax_summary(amax: AmaxTable, recipe: str, experts: str, ignored: list[str]) -> dict:
    """What the report says of the amax file (no paths: the report is deterministic)."""
    return {
        "format": amax.source.format,
        "files": len(amax.source.files),
        "entries": len(amax.source.entries),
        "modules": len(amax.modules),
        "calibrated_with_modelopt": amax.source.modelopt_version,
        "recipe": recipe,
        "experts": experts,
        "uncalibrated_inputs": len(amax.uncalibrated_inputs),
        "ignored_by_recipe": len(ignored),
    }


def _output_config(
    release: Checkpoint, amax: AmaxTable, layout: dict[str, M.TargetTensor], recipe: str, target_vllm: str
) -> FixResult:
    """config.json and hf_quant_config.json, as today's path writes them from the export's."""
    cfg = transformers_saved_config(release.config)
    source_cfg: dict | None = release.config
    if recipe == "full":  # no MTP block written
        announce_no_mtp(cfg)
        source_cfg = None
    # what the rewrite reads from an export's hf_quant_config.json: ModelOpt's producer entry (the
    # ModelOpt that calibrated the amax, where the file records it) and no KV-cache quantization
    producer = {"name": "modelopt", "version": amax.source.modelopt_version or "unknown"}
    hfq = {"producer": producer, "quantization": {"kv_cache_quant_algo": None}}
    return fix_config(
        cfg,
        target=target_vllm,
        source_config=source_cfg,
        tensor_keys=list(layout),
        hf_quant_config=hfq,
        where=str(release.root / CONFIG_NAME),
        source_where=str(release.root / CONFIG_NAME),
    )


__all__ = ["amax_summary", "plan_from_release"]
