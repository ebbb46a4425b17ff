"""`dsv4 e2e`: the whole pipeline on the built-in micro DeepSeek V4 (pipeline/e2e.py), and its table."""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from pipeline.cli.options import command_parser
from pipeline.errors import DsV4Error

SUMMARY = "the pipeline end to end on the built-in micro model (needs the quant extras)"

DESCRIPTION = """\
The whole pipeline on the built-in micro DeepSeek V4, on this machine: the README's main job.

It builds a deterministic tiny checkpoint in the release layout (FP8 attention, MXFP4 experts,
hash/sliding/CSA/HCA layers, an MTP block) and validates it. Then the one-GPU path, as the node runs it:
`dsv4 calibrate` (ModelOpt calibration one decoder layer at a time, weights dequantized from the release
in memory) for both recipes, and `dsv4 convert RELEASE --amax` straight into the layout vLLM loads
(experts requantized, experts transcoded, full). Then the BF16 path the seed notes ran (`dsv4 dequant`,
`dsv4 quantize` on the whole BF16 model, `dsv4 convert` of the export), whose output must be the same
bytes: e2e stops if one file differs (--skip-bf16-path leaves it out). Each converted checkpoint is
scored against the BF16 model: transformers' DeepseekV4ForCausalLM in float32 with the weights vLLM
would compute with (harness/vllm_view.py: FP8 tiles dequantized, NVFP4 experts with w1's global scale
for the fused w13). The converted checkpoints (--workdir keeps them) are for checking what vLLM loads,
not for serving: `dsv4 serve` refuses the micro model, and e2e prints why.
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
    p.add_argument(
        "--skip-bf16-path",
        action="store_true",
        help="do not run the BF16 path (dequant -> whole-model quantize -> convert) beside the one-GPU path "
        "to check that it writes the same bytes",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.e2e import require_quant_extras, run_e2e

    require_quant_extras()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="dsv4-e2e-"))
    if args.workdir and work.exists() and any(work.iterdir()):
        raise DsV4Error(f"{work}: not empty; pass a new --workdir")
    work.mkdir(parents=True, exist_ok=True)
    print(f"dsv4 e2e: {args.preset} model, seed {args.seed}, in {work}")
    scores = run_e2e(work, args.preset, args.seed, bf16_path=not args.skip_bf16_path)
    print("\nrecipe     KL(BF16 || converted)  top-1 agreement   (4x64 tokens; weights as vLLM loads them)")
    for name, score in scores.items():
        print(f"{name:<10} {score['kl']:21.4f}  {score['top1']:15.3f}")
    if args.workdir:
        print(f"\nconverted checkpoints, in the layout vLLM loads: {work}/vllm-{{experts,transcode,full}}")
        config = json.loads((work / "vllm-experts" / "config.json").read_text())
        print(serve_note(work / "vllm-experts", config))
    else:
        print("\n(pass --workdir DIR to keep every checkpoint, the converted ones included)")
        shutil.rmtree(work, ignore_errors=True)
    return 0


# vLLM's DeepSeek V4 attention kernels need this head_dim (the domain brief, section 6; harness/tiny.py).
VLLM_V4_HEAD_DIM = 512


def serve_note(ckpt: Path, config: dict) -> str:
    """What `dsv4 serve` says about an e2e checkpoint, and why: the tiny models are for checking what vLLM
    loads, not for serving. Every line must stay true: `dsv4 serve` refuses a checkpoint without a
    tokenizer and one whose heads the tensor parallel size does not divide (pipeline/serve/checks.py)."""
    from pipeline.serve.checks import TOKENIZER_FILES
    from pipeline.serve.settings import NODE_GPUS  # serve's tensor parallel size where no GPU is visible

    heads, head_dim = config.get("num_attention_heads"), config.get("head_dim")
    lines = [f"not for serving: dsv4 serve refuses them (`dsv4 serve {ckpt} --print` says why):"]
    if not any((ckpt / name).is_file() for name in TOKENIZER_FILES):
        lines.append("  - no tokenizer: the tiny model has none (serve's --tokenizer DIR names one)")
    if isinstance(heads, int) and heads % NODE_GPUS:
        divisors = ", ".join(str(d) for d in range(1, heads + 1) if heads % d == 0)
        lines.append(
            f"  - {heads} attention heads: serve's default tensor parallel size (the GPUs visible, else "
            f"{NODE_GPUS}) must divide them (--tensor-parallel-size {divisors})"
        )
    if head_dim != VLLM_V4_HEAD_DIM:
        lines.append(
            f"  - past those checks, vLLM's V4 attention kernels need head_dim {VLLM_V4_HEAD_DIM}; this "
            f"model's is {head_dim} (--preset vllm-shaped has {VLLM_V4_HEAD_DIM}; serving it was never tried)"
        )
    lines.append(
        "they are for checking what vLLM loads: `dsv4 validate` here; the vllm tiers load checkpoints converted "
        "the same way with vLLM's own loader (tests/convert/test_node_vllm_loads.py, tests/plugin)"
    )
    return "\n".join(lines)
