"""`dsv4 fix-config CKPT`: rewrite config.json (+ hf_quant_config.json) for vLLM (pipeline/vllm_config/files.py,
by the rules of pipeline/vllm_config/)."""

from __future__ import annotations

import argparse
import json

from pipeline.cli.options import add_dry_run, add_json, add_target_vllm, command_parser

SUMMARY = "rewrite config.json (+ hf_quant_config.json) for vLLM 0.32/0.33"

DESCRIPTION = """\
Rewrite CKPT/config.json so that vLLM's DeepSeek V4 code loads it, and write CKPT/hf_quant_config.json
for a checkpoint with NVFP4 routed experts (the mixed FP8 + NVFP4 layout).

The rewrites are a table of named rules, each applying to some vLLM versions:
{table}

Every change is printed with its reason; "unchanged: already fixed" when there is nothing to do.
Running it twice changes nothing the second time. The first rewrite keeps the original as
config.json.orig (and hf_quant_config.json.orig); files are written atomically (temp + rename).
The tensor list comes from CKPT/model.safetensors.index.json (or the one .safetensors header).
"""


def _rules_table() -> str:
    from pipeline.vllm_config import RULES

    return "\n".join(f"  {r.name:<18} [{', '.join(r.versions)}] {', '.join(r.keys)}" for r in RULES)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = command_parser(subparsers, __name__, SUMMARY, DESCRIPTION.format(table=_rules_table()))
    p.add_argument("ckpt", help="checkpoint directory (with config.json)")
    add_target_vllm(p)
    p.add_argument(
        "--source-config",
        metavar="PATH",
        help="the release/BF16 config.json the checkpoint came from (restores compress_ratios, "
        "num_hash_layers)",
    )
    add_dry_run(p, "print the changes")
    add_json(p, "the result")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.vllm_config.files import describe_fix, plan_fix, write_fix

    result = plan_fix(args.ckpt, args.target_vllm, args.source_config)
    written = [] if args.dry_run else write_fix(args.ckpt, result)
    if args.json:
        print(
            json.dumps(
                {
                    "ckpt": str(args.ckpt),
                    "target_vllm": args.target_vllm,
                    "dry_run": args.dry_run,
                    "changed": result.changed,
                    "changes": [c.to_json() for c in result.changes],
                    "written": [str(p) for p in written],
                },
                indent=2,
            )
        )
        return 0
    if not result.changed:
        print(f"{args.ckpt}: unchanged: already fixed for vLLM {args.target_vllm}")
        return 0
    print(describe_fix(args.ckpt, result, written, dry_run=args.dry_run, target=args.target_vllm))
    return 0
