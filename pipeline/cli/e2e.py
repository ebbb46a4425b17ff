"""`dsv4 e2e`: the whole pipeline on the built-in micro DeepSeek V4 (pipeline/e2e.py), and its table."""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from pipeline.cli.options import command_parser
from pipeline.errors import DsV4Error

SUMMARY = "the pipeline end to end on the built-in micro model (needs the quant extras)"

DESCRIPTION = """\
The whole pipeline on the built-in micro DeepSeek V4, on this machine: the README's main job.

It builds a deterministic tiny checkpoint in the release layout (FP8 attention, MXFP4 experts,
hash/sliding/CSA/HCA layers, an MTP block), validates it, dequantizes it with `dsv4 dequant`, quantizes
the BF16 copy with real ModelOpt for both recipes, converts each export into the layout vLLM loads with
`dsv4 convert` (the experts recipe grafted onto the release, as NVIDIA does), and scores each converted
checkpoint against the BF16 model: transformers' DeepseekV4ForCausalLM in float32 with the weights vLLM
would compute with (harness/vllm_view.py: FP8 tiles dequantized, NVFP4 experts with w1's global scale
for the fused w13).
Needs the quant extras: pip install -c constraints.txt -e '.[quant]'.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = command_parser(subparsers, __name__, SUMMARY, DESCRIPTION)
    p.add_argument(
        "--workdir",
        type=Path,
        metavar="DIR",
        help="keep every intermediate checkpoint here; when not given, a temporary folder, removed after",
    )
    p.add_argument("--preset", default="micro", choices=["micro", "vllm-shaped"], help="tiny model")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the tiny model's weights")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.e2e import require_quant_extras, run_e2e

    require_quant_extras()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="dsv4-e2e-"))
    if args.workdir and work.exists() and any(work.iterdir()):
        raise DsV4Error(f"{work}: not empty; pass a new --workdir")
    work.mkdir(parents=True, exist_ok=True)
    print(f"dsv4 e2e: {args.preset} model, seed {args.seed}, in {work}")
    scores = run_e2e(work, args.preset, args.seed)
    print("\nrecipe     KL(BF16 || converted)  top-1 agreement   (4x64 tokens; weights as vLLM loads them)")
    for name, score in scores.items():
        print(f"{name:<10} {score['kl']:21.4f}  {score['top1']:15.3f}")
    if args.workdir:
        print(f"\nconverted checkpoints, in the layout vLLM loads: {work}/vllm-{{experts,transcode,full}}")
        print(
            "(to serve one, dsv4 serve needs --tokenizer, since the tiny model has none, and a "
            "--tensor-parallel-size that divides its attention heads)"
        )
    else:
        print("\n(pass --workdir DIR to keep every checkpoint, the converted ones included)")
        shutil.rmtree(work, ignore_errors=True)
    return 0
