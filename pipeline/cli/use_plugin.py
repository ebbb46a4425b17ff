"""`dsv4 use-plugin CKPT [--off]`: let vLLM load a ModelOpt export directly, through this package's
plugin (pipeline/plugin_opt_in.py writes the config; patches/vllm_plugin.py is the plugin)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from patches.vllm_plugin import ARCHITECTURE, ENTRY_POINT_GROUP, ENTRY_POINT_NAME
from pipeline.cli.options import add_dry_run, add_target_vllm, command_parser

SUMMARY = "let vLLM load a ModelOpt export directly (the dsv4 plugin), or --off to stop"

DESCRIPTION = f"""\
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
    p = command_parser(subparsers, __name__, SUMMARY, DESCRIPTION)
    p.add_argument("ckpt", help="a ModelOpt NVFP4 export directory (dialect H or X)")
    p.add_argument("--off", action="store_true", help="restore config.json (and hf_quant_config.json)")
    add_target_vllm(p)
    add_dry_run(p, "print the changes")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    ckpt = Path(args.ckpt)
    return _turn_off(ckpt, args.dry_run) if args.off else _turn_on(ckpt, args.target_vllm, args.dry_run)


def _turn_off(ckpt: Path, dry_run: bool) -> int:
    from pipeline.plugin_opt_in import turn_off
    from pipeline.vllm_config.files import BACKUP_SUFFIX

    restored = turn_off(ckpt, dry_run=dry_run)
    if not restored:
        print(f"{ckpt}: unchanged: config.json does not name {ARCHITECTURE} (the plugin is off)")
        return 0
    verb = "would restore" if dry_run else "restored"
    for path in restored:
        print(f"{verb} {path} from {path.name}{BACKUP_SUFFIX}")
    print(f"{ckpt}: vLLM no longer uses the dsv4 plugin for it (the export's own config is back)")
    return 0


def _turn_on(ckpt: Path, target: str, dry_run: bool) -> int:
    from pipeline.plugin_opt_in import plan_on
    from pipeline.vllm_config.files import describe_fix, write_fix

    on = plan_on(ckpt, target)
    result, plan = on.result, on.convert
    print(
        f"{ckpt}: ModelOpt export, dialect {plan.dialect}: {len(plan.mapping.mappings)} tensors map onto "
        f"{len(plan.layout)} tensors of the layout vLLM loads ({len(plan.dropped)} not passed on); the "
        "plugin converts them while vLLM loads them"
    )
    if not result.changed:
        print(f"{ckpt}: unchanged: config.json already names {ARCHITECTURE} for vLLM {target}")
        return 0
    written = [] if dry_run else write_fix(ckpt, result)
    print(describe_fix(ckpt, result, written, dry_run=dry_run, target=target))
    if not dry_run:
        print(
            f"serve it with vLLM where this package is installed (entry point {ENTRY_POINT_NAME} in group "
            f"{ENTRY_POINT_GROUP}); add --tokenizer-mode deepseek_v4 and VLLM_USE_BREAKABLE_CUDAGRAPH=1 "
            "(vLLM keys those defaults on its own architecture name). Undo: dsv4 use-plugin --off "
            f"{json.dumps(str(ckpt))}"
        )
    return 0
