"""What dsv4 serve refuses before any GPU time: a refused MoE backend (ours or passed through), a refused
vLLM setting (``REFUSALS``, each with the failure it causes), or a pass-through flag for a setting dsv4
serve makes itself."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.serve.backends import MOE_BY_NAME, moe_backends, normalize_backend
from pipeline.serve.flags import FLAG_BY_DEST, render
from pipeline.serve.settings import ServeSettings
from pipeline.serve.spellings import settings_in, shown


@dataclass(frozen=True)
class Refusal:
    setting: str  # vLLM's parsed attribute (dest)
    values: frozenset[str] | None  # refused values; None: any value
    why: str
    seen: str  # where it failed, or the vLLM source that makes it fail


REFUSALS: tuple[Refusal, ...] = (
    Refusal(
        "quantization",
        frozenset({"modelopt", "modelopt_fp4", "modelopt_mixed", "modelopt_mxfp8"}),
        "replaces DeepseekV4FP8Config (which vLLM picks from the checkpoint's quant_method fp8) by a ModelOpt "
        "config that builds V4's linear layers as ModelOpt FP8/NVFP4/MXFP8; attention and compressor then "
        "get parameters they cannot load: leave --quantization unset",
        "seeds S7-S8 (fused_wkv_wgate shape mismatch, KeyError fused_wkv_wgate.weight_scale)",
    ),
    Refusal(
        "config",
        None,
        "vLLM would read further flags from that YAML file, which dsv4 serve cannot check; pass them "
        "after --vllm-args instead",
        "vllm/utils/argparse_utils.py FlexibleArgumentParser._pull_args_from_config",
    ),
)


def refusals(settings: ServeSettings) -> list[str]:
    """Every reason the command would not work: a refused MoE backend (ours or passed through), a
    refused setting, or a pass-through flag for a setting dsv4 serve makes itself."""
    problems: list[str] = []
    extra = settings_in(settings.extra)
    for dest, uses in sorted(extra.items()):
        flag = FLAG_BY_DEST.get(dest)
        spelled = ", ".join(shown(w, v) for w, v in uses)
        if dest == "model":
            problems.append(f"{spelled}: dsv4 serve passes the checkpoint as the model; drop it")
        elif flag is not None and dest != "moe_backend":
            how = f"use its {flag.ours} option" if flag.ours else f"always {render(flag.value(settings))[0]}"
            problems.append(f"{spelled}: dsv4 serve sets {flag.option} itself ({how})")
    backends = [("--moe-backend", settings.moe_backend)]
    backends += [(w, v) for w, v in extra.get("moe_backend", []) if v is not None]
    for spelled, value in backends:
        name = normalize_backend(value)
        backend = MOE_BY_NAME.get(name)
        if backend is None or settings.target_vllm not in backend.versions:
            known = ", ".join(b.name for b in moe_backends(settings.target_vllm))
            problems.append(
                f"{shown(spelled, value)}: not a vLLM {settings.target_vllm} MoE backend (known: {known})"
            )
        elif backend.refused:
            problems.append(f"{shown(spelled, value)}: refused for NVFP4 experts: {backend.refused}")
    for refusal in REFUSALS:
        for spelled, value in extra.get(refusal.setting, []):
            if refusal.values is None or (value is not None and value.lower() in refusal.values):
                problems.append(f"{shown(spelled, value)}: refused: {refusal.why} ({refusal.seen})")
    return problems
