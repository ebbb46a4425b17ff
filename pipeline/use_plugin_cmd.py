"""`dsv4 use-plugin CKPT [--off]`: let vLLM load a ModelOpt export directly, through this package's plugin.

Writes the plugin's architecture (``patches.vllm_plugin.ARCHITECTURE``) into CKPT/config.json, with the
rest of the config ``dsv4 convert`` would write for the same export (``pipeline.config.fix_config``'s
rules, fed the converted layout's native key names; no MTP block), and hf_quant_config.json as convert
writes it. ``--off`` puts back the files as they were (config.json.orig, hf_quant_config.json.orig).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from patches.vllm_plugin import ARCHITECTURE, ENTRY_POINT_GROUP, ENTRY_POINT_NAME
from pipeline.checkpoint import CONFIG_NAME, Layout, ensure_valid
from pipeline.checkpoint.reader import read_json_object
from pipeline.checkpoint.writer import copy_file_atomic
from pipeline.config import ABSENT, DEFAULT_TARGET, HF_QUANT_CONFIG, VLLM_TARGETS, Change, FixResult
from pipeline.convert import ConvertPlan, plan_convert
from pipeline.errors import DsV4Error
from pipeline.fix_config_cmd import BACKUP_SUFFIX, apply, print_changes

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

HELP = f"""\
Let vLLM load the ModelOpt NVFP4 export CKPT as it is, without a converted copy: the plugin this
package installs into vLLM (entry point {ENTRY_POINT_NAME} of group {ENTRY_POINT_GROUP}) converts each
tensor while vLLM loads it, with the table and actions of `dsv4 convert` (the result is the same, byte
for byte). It is opt-in: vLLM uses it only for a checkpoint whose config.json names the architecture
{ARCHITECTURE}, which this command writes.

This command checks the export (headers, every key mapped, shapes), then rewrites CKPT/config.json to
what `dsv4 convert` would write for it (fix-config's rules: quant_method fp8 + moe_quant_algo NVFP4,
...; num_nextn_predict_layers 0, since an export has no MTP block), naming the plugin's architecture,
and CKPT/hf_quant_config.json as convert writes it. Each change is printed with its reason. The first
rewrite keeps the originals as config.json.orig and hf_quant_config.json.orig; files are written
atomically; running it again changes nothing. --off puts the .orig files back.

Then serve CKPT with vLLM, with this package installed in vLLM's environment (`pip install --no-deps
-e .`). vLLM keys a few DeepSeek V4 defaults on the architecture name, so pass them yourself:
--tokenizer-mode deepseek_v4, and VLLM_USE_BREAKABLE_CUDAGRAPH=1 in the environment (docs/plugin.md).
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "use-plugin",
        help="let vLLM load a ModelOpt export directly (the dsv4 plugin), or --off to stop",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("ckpt", help="a ModelOpt NVFP4 export directory (dialect H or X)")
    p.add_argument("--off", action="store_true", help="restore config.json (and hf_quant_config.json)")
    p.add_argument(
        "--target-vllm",
        choices=VLLM_TARGETS,
        default=DEFAULT_TARGET,
        help=f"vLLM version that will serve it (default: {DEFAULT_TARGET})",
    )
    p.add_argument("--dry-run", action="store_true", help="print the changes, write nothing")
    p.set_defaults(func=_main)


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


def _main(args: argparse.Namespace) -> int:
    ckpt = Path(args.ckpt)
    if args.off:
        restored = turn_off(ckpt, dry_run=args.dry_run)
        if not restored:
            print(f"{ckpt}: unchanged: config.json does not name {ARCHITECTURE} (the plugin is off)")
            return 0
        verb = "would restore" if args.dry_run else "restored"
        for path in restored:
            print(f"{verb} {path} from {path.name}{BACKUP_SUFFIX}")
        print(f"{ckpt}: vLLM no longer uses the dsv4 plugin for it (the export's own config is back)")
        return 0
    on = plan_on(ckpt, args.target_vllm)
    result, plan = on.result, on.convert
    print(
        f"{ckpt}: ModelOpt export, dialect {plan.dialect}: {len(plan.mapping.mappings)} tensors map onto "
        f"{len(plan.layout)} tensors of the layout vLLM loads ({len(plan.dropped)} not passed on); the "
        "plugin converts them while vLLM loads them"
    )
    if not result.changed:
        print(f"{ckpt}: unchanged: config.json already names {ARCHITECTURE} for vLLM {args.target_vllm}")
        return 0
    written = [] if args.dry_run else apply(ckpt, result)
    print_changes(ckpt, result, written, dry_run=args.dry_run, target=args.target_vllm)
    if not args.dry_run:
        print(
            f"serve it with vLLM where this package is installed (entry point {ENTRY_POINT_NAME} in group "
            f"{ENTRY_POINT_GROUP}); add --tokenizer-mode deepseek_v4 and VLLM_USE_BREAKABLE_CUDAGRAPH=1 "
            "(vLLM keys those defaults on its own architecture name). Undo: dsv4 use-plugin --off "
            f"{json.dumps(str(ckpt))}"
        )
    return 0
