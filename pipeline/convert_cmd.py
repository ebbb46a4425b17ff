"""`dsv4 convert EXPORT DST`: a ModelOpt NVFP4 export -> the layout vLLM loads (see pipeline/convert.py)."""

from __future__ import annotations

import argparse

from pipeline.config import DEFAULT_TARGET, VLLM_TARGETS
from pipeline.convert import EXPERT_SOURCES, convert_checkpoint, dry_run_table, plan_convert
from pipeline.mapping import DIALECTS
from pipeline.step_options import add_streaming_options, max_shard_bytes

HELP = """\
Convert a ModelOpt NVFP4 export of DeepSeek V4 into the layout vLLM's DeepSeek V4 code loads: the release
layout (native names, FP8 block attention with UE8M0 .scale tiles, BF16 compressor and indexer weights)
with NVFP4 routed experts, plus config.json and hf_quant_config.json rewritten by the fix-config rules.

Every export key is mapped by one table (pipeline/mapping.py, docs/mapping.md): ModelOpt 0.45 exports
with transformers names (dialect H), ModelOpt 0.47 + transformers 5.23 exports (X), native names (N).
An unmapped key, a missing tensor or a wrong shape stops the step before any work, naming the key.

--graft-from RELEASE takes every tensor that is not a routed expert byte for byte from the release
(the experts recipe: attention stays exactly as released) and adds the release's MTP block, whose
routed experts are transcoded from MXFP4 (exactly where their exponents fit). Without it the export has
no MTP block (transformers has none) and the output declares num_nextn_predict_layers 0.

--experts transcode (with --graft-from) takes the routed experts' weights from the release instead: the
MXFP4 E2M1 bytes unchanged, power-of-two NVFP4 scales, bit-exact where an expert's w1+w3 block exponents
together (they share weight_scale_2; w2's alone) span at most 17 octaves (`dsv4 transcode-scan RELEASE`
says how many do); only the activation scales come from
the export's calibration. Quantizing the BF16 copy (the experts recipe) re-rounds every block instead.

Where an expert's w1 and w3 have different weight_scale_2 (vLLM keeps w1's for the fused w13), both get
the larger and the other's block scales are re-expressed; the added error is measured and printed.

DST is written shard by shard under temporary names, the index last; --resume continues a killed run
with byte-identical output. EXPORT and RELEASE are only read.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert",
        help="ModelOpt NVFP4 export -> the layout vLLM loads (streaming, resumable)",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("export", help="ModelOpt export directory (from dsv4 quantize or hf_ptq)")
    p.add_argument("dst", help="output directory (new or empty; see --resume/--overwrite)")
    p.add_argument(
        "--graft-from", metavar="RELEASE", help="release checkpoint to take non-expert tensors from"
    )
    p.add_argument(
        "--dialect",
        choices=sorted(DIALECTS),
        help="key dialect of the export (default: detected; "
        + "; ".join(f"{d}: {w}" for d, w in DIALECTS.items())
        + ")",
    )
    p.add_argument(
        "--experts",
        choices=EXPERT_SOURCES,
        default="export",
        help="where the routed experts' NVFP4 weights come from: the export as quantized (default), or "
        "'transcode': the release's MXFP4 re-expressed as NVFP4, bit-exact where the exponents fit, with "
        "the export's calibrated activation scales (needs --graft-from)",
    )
    p.add_argument(
        "--target-vllm",
        choices=VLLM_TARGETS,
        default=DEFAULT_TARGET,
        help=f"vLLM version the config is written for (default: {DEFAULT_TARGET})",
    )
    add_streaming_options(p)
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    max_bytes = max_shard_bytes(args)
    common = dict(
        experts=args.experts,
        graft_from=args.graft_from,
        dialect=args.dialect,
        target_vllm=args.target_vllm,
        max_shard_bytes=max_bytes,
        full_scales=args.full_scales,
    )
    if args.dry_run:
        print(dry_run_table(plan_convert(args.export, **common), args.dst))
        return 0
    result = convert_checkpoint(
        args.export,
        args.dst,
        resume=args.resume,
        overwrite=args.overwrite,
        device=args.device,
        workers=args.workers,
        progress=not args.quiet,
        **common,
    )
    print(result.summary())
    return 0
