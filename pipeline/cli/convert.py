"""`dsv4 convert EXPORT DST` (a ModelOpt NVFP4 export) or `dsv4 convert RELEASE DST --amax AMAX` (the
release and an amax file) -> the layout vLLM loads (pipeline/convert/)."""

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

--amax AMAX: the first argument is the RELEASE, and no export is needed: AMAX is the calibration (one
safetensors keyed by ModelOpt quantizer names, as `dsv4 quantize` keeps it in <export>.calibration/
amax.safetensors, or a folder of NVIDIA ptq.py's amax_dict_rank<r>-mp<mp>.pt). The output is what
dequant -> quantize -> convert would write, byte for byte: --recipe experts (the default) grafts every
non-expert tensor and requantizes the routed experts from the release's MXFP4 with the calibrated weight
amax (--experts requantize, the default) or transcodes them (--experts transcode); --recipe full also
quantizes every module the amax covers (attention, shared experts, compressor, indexer) and maps it as
convert maps a full-recipe export, and writes no MTP block. Activation scales come from the input amax.

DST is written shard by shard under temporary names, the index last; --resume continues a killed run
with byte-identical output (and notices a changed AMAX). EXPORT, RELEASE and AMAX are only read.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from pipeline.convert.constants import AMAX_EXPERT_SOURCES, AMAX_RECIPES, EXPERT_SOURCES
    from pipeline.mapping import DIALECTS

    p = command_parser(subparsers, __name__, SUMMARY, DESCRIPTION)
    p.add_argument(
        "export", help="ModelOpt export directory (from dsv4 quantize or hf_ptq), or with --amax the RELEASE"
    )
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
        choices=sorted(set(EXPERT_SOURCES) | set(AMAX_EXPERT_SOURCES)),
        default=None,
        help="where the routed experts' NVFP4 weights come from: 'export', as quantized (without --amax), "
        "'transcode': the release's MXFP4 re-expressed as NVFP4, bit-exact where the exponents fit, with "
        "the calibrated activation scales (needs --graft-from or --amax), or 'requantize' (with --amax): "
        "the release's MXFP4 through BF16 to NVFP4 with the calibrated weight amax; when not given, "
        "'export', or with --amax 'requantize'",
    )
    p.add_argument(
        "--amax",
        metavar="AMAX",
        help="convert from the release (the first argument) and this amax file or NVIDIA amax folder: no "
        "export needed",
    )
    p.add_argument(
        "--recipe",
        choices=AMAX_RECIPES,
        default="experts",
        help="with --amax: what the calibration quantized (experts: routed experts only; full: every "
        "module the amax file covers)",
    )
    add_target_vllm(p)
    add_streaming_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.convert import convert_checkpoint, dry_run_table, plan_convert

    options = dict(
        experts=args.experts,
        graft_from=args.graft_from,
        dialect=args.dialect,
        target_vllm=args.target_vllm,
        amax=args.amax,
        recipe=args.recipe,
    )
    if args.dry_run:
        plan = plan_convert(
            args.export, **options, max_shard_bytes=max_shard_bytes(args), full_scales=args.full_scales
        )
        print(dry_run_table(plan, args.dst))
        return 0
    print(convert_checkpoint(args.export, args.dst, **options, **streaming_step_arguments(args)).summary())
    return 0
