"""Opting a ModelOpt export into the dsv4 vLLM plugin (patches/vllm_plugin.py), and out again: what
`dsv4 use-plugin` writes.

On: the plugin's architecture (``patches.vllm_plugin.ARCHITECTURE``) in CKPT/config.json, with the rest
of the config `dsv4 convert` would write for the same export (``pipeline.vllm_config.fix_config``'s rules, fed
the converted layout's native key names; no MTP block), and hf_quant_config.json as convert writes it.
Off: the files as they were (config.json.orig, hf_quant_config.json.orig).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from patches.vllm_plugin import ARCHITECTURE
from pipeline.checkpoint import CONFIG_NAME, Layout, ensure_valid
from pipeline.checkpoint.reader import read_json_object
from pipeline.checkpoint.writer import copy_file_atomic
from pipeline.convert import ConvertPlan, plan_convert
from pipeline.errors import DsV4Error
from pipeline.vllm_config import ABSENT, DEFAULT_TARGET, HF_QUANT_CONFIG, Change, FixResult
from pipeline.vllm_config.files import BACKUP_SUFFIX

STEP = "dsv4 use-plugin"

WHY_ARCHITECTURE = (
    f"vLLM builds the plugin's class only for a checkpoint whose architectures names {ARCHITECTURE} "
    "(opt-in); it is vLLM's DeepseekV4ForCausalLM with load_weights converting each export tensor as it "
    "loads, by the same table and actions as dsv4 convert"
)
WHY_NO_MTP = (
    "the export has no MTP block (transformers has no MTP module), and the plugin cannot graft one from "
    "the release: vLLM must not build an MTP draft (as dsv4 convert without --graft-from)"
)


def _config(ckpt: Path) -> dict:
    path = ckpt / CONFIG_NAME
    if not path.is_file():
        raise DsV4Error(f"{path}: no config.json there")
    return read_json_object(path)


def uses_plugin(config: dict) -> bool:
    return ARCHITECTURE in (config.get("architectures") or [])


@dataclass(frozen=True)
class PluginPlan:
    """What turning the plugin on rewrites (``result``), and the conversion plan it rests on."""

    result: FixResult
    convert: ConvertPlan


def plan_on(ckpt: str | Path, target: str = DEFAULT_TARGET) -> PluginPlan:
    """The rewrite that turns the plugin on (validates the export; writes nothing)."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise DsV4Error(f"{ckpt}: not a directory")
    current = _config(ckpt)
    ensure_valid(ckpt, expect=Layout.NVFP4, step=STEP)
    plan = plan_convert(ckpt, target_vllm=target, scale_sample=0)  # validated just now
    if plan.dialect == "N":
        raise DsV4Error(
            f"{ckpt}: {STEP}: the keys are already the release's names (dialect N): this is a converted "
            "checkpoint, which vLLM loads as it is, without the plugin"
        )
    changes = list(plan.config_changes)
    covered = {c.key.split(".")[0] for c in changes}
    for key in sorted(set(current) | set(plan.config)):
        if key in covered or key == "architectures":
            continue
        before, after = current.get(key, ABSENT), plan.config.get(key, ABSENT)
        if before != after:
            changes.append(Change("no-mtp", key, before, after, WHY_NO_MTP))
    config = dict(plan.config)
    if config.get("architectures") != [ARCHITECTURE]:
        config["architectures"] = [ARCHITECTURE]
    if current.get("architectures") != config["architectures"]:
        before = current.get("architectures", ABSENT)
        changes.append(
            Change("use-plugin", "architectures", before, config["architectures"], WHY_ARCHITECTURE)
        )
    result = FixResult(config=config, hf_quant_config=plan.hf_quant_config, changes=tuple(changes))
    return PluginPlan(result, plan)


def turn_off(ckpt: str | Path, dry_run: bool = False) -> list[Path]:
    """Put back config.json (and hf_quant_config.json) from their .orig copies; [] if the checkpoint does
    not use the plugin."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise DsV4Error(f"{ckpt}: not a directory")
    if not uses_plugin(_config(ckpt)):
        return []
    backup = ckpt / (CONFIG_NAME + BACKUP_SUFFIX)
    if not backup.is_file():
        raise DsV4Error(
            f"{ckpt / CONFIG_NAME}: names {ARCHITECTURE} but there is no {backup.name} to restore; "
            'set architectures back by hand (e.g. ["DeepseekV4ForCausalLM"])'
        )
    if uses_plugin(read_json_object(backup)):
        raise DsV4Error(f"{backup}: names {ARCHITECTURE} itself; it is not the original config")
    restored = []
    for name in (HF_QUANT_CONFIG, CONFIG_NAME):  # config.json last: it is what says "plugin on"
        orig = ckpt / (name + BACKUP_SUFFIX)
        if orig.is_file():
            if not dry_run:
                copy_file_atomic(orig, ckpt, name)
            restored.append(ckpt / name)
    return restored
