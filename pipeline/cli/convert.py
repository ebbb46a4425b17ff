"""`dsv4 convert EXPORT DST`: a ModelOpt NVFP4 export -> the layout vLLM loads (pipeline/convert/)."""

from __future__ import annotations

import argparse

from pipeline.cli.options import (
    add_streaming_options,
    add_target_vllm,
    command_parser,
    max_shard_bytes,
    streaming_step_arguments,
)

SUMMARY = "ModelOpt NVFP4 export -> the layout vLLM loads (streaming, resumable)"

DESCRIPTION = """\
Convert a ModelOpt NVFP4 export of DeepSeek V4 into the layout vLLM's DeepSeek V4 code loads: the release
layout (native names, FP8 block attention with UE8M0 .scale tiles, BF16 compressor and indexer weights)
with NVFP4 routed experts, plus config.json and hf_quant_config.json rewritten by the fix-config rules.

Every export key is mapped by one table (pipeline/mapping/, docs/mapping.md): ModelOpt 0.45 exports
with transformers names (dialect H), ModelOpt 0.47 + transformers 5.23 exports (X), native names (N).
An unmapped key, a missing tensor or a wrong shape stops the step before any work, naming the key.

--graft-from RELEASE takes every tensor that is not a routed expert byte for byte from the release
(the experts recipe: attention stays exactly as released) and adds the release's MTP block, whose
routed experts are transcoded from MXFP4 (exactly where their exponents fit). Without it the export has
no MTP block (transformers has none) and the output declares num_nextn_predict_layers 0.

--experts transcode (with --graft-from) takes the routed experts' weights from the release instead: the
MXFP4 E2M1 bytes unchanged, power-of-two NVFP4 scales, bit-exact where an expert's w1+w3 block exponents
together (they share weight_scale_2; w2's alone) span at most 17 octaves (`dsv4 transcode-scan RELEASE`
says how many do); only the activation scales come from the export's calibration. Quantizing the BF16
copy (the experts recipe) re-rounds every block instead.

Where an expert's w1 and w3 have different weight_scale_2 (vLLM keeps w1's for the fused w13), both get
the larger and the other's block scales are re-expressed; the added error is measured and printed.

DST is written shard by shard under temporary names, the index last; --resume continues a killed run
with byte-identical output. EXPORT and RELEASE are only read.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from pipeline.convert.constants import EXPERT_SOURCES
    from pipeline.mapping import DIALECTS

    p = command_parser(subparsers, __name__, SUMMARY, DESCRIPTION)
    p.add_argument("export", help="ModelOpt export directory (from dsv4 quantize or hf_ptq)")
    p.add_argument("dst", help="output directory (new or empty; see --resume/--overwrite)")
    p.add_argument(
        "--graft-from", metavar="RELEASE", help="release checkpoint to take non-expert tensors from"
    )
    p.add_argument(
        "--dialect",
        choices=sorted(DIALECTS),
        help="key dialect of the export, detected from its keys when not given ("
        + "; ".join(f"{d}: {w}" for d, w in DIALECTS.items())
        + ")",
    )
    p.add_argument(
        "--experts",
        choices=EXPERT_SOURCES,
        default="export",
        help="where the routed experts' NVFP4 weights come from: the export as quantized, or "
        "'transcode': the release's MXFP4 re-expressed as NVFP4, bit-exact where the exponents fit, with "
        "the export's calibrated activation scales (needs --graft-from)",
    )
    add_target_vllm(p)
    add_streaming_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.convert import convert_checkpoint, dry_run_table, plan_convert

    options = dict(
        experts=args.experts, graft_from=args.graft_from, dialect=args.dialect, target_vllm=args.target_vllm
    )
    if args.dry_run:
        plan = plan_convert(
            args.export, **options, max_shard_bytes=max_shard_bytes(args), full_scales=args.full_scales
        )
        print(dry_run_table(plan, args.dst))
        return 0
    print(convert_checkpoint(args.export, args.dst, **options, **streaming_step_arguments(args)).summary())
    return 0
