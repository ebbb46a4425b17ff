"""What the checkpoint must be before any GPU time is spent, each check with its reason:
``CONFIG_CHECKS`` from config.json alone (the layout ``dsv4 convert`` writes: ``quant_method: fp8`` +
``moe_quant_algo: NVFP4``, V4's architecture), then ``CHECKPOINT_CHECKS`` (native names, exactly
``pipeline.mapping.target_layout``, its config already what the target vLLM loads, a tokenizer, attention
heads divisible by the tensor parallel size (vllm/config/model.py
``ModelConfig.verify_with_parallel_config``), and an MTP block when MTP speculative decoding is asked)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline import mapping as M
from pipeline.errors import DsV4Error
from pipeline.serve.settings import ServeSettings
from pipeline.vllm_config import layout_config

if TYPE_CHECKING:  # the tables are read by `dsv4 serve --help`, which must not import torch
    from pipeline.checkpoint import Checkpoint

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


@dataclass
class CheckContext:
    settings: ServeSettings
    config: dict
    checkpoint: Checkpoint | None = None

    @property
    def keys(self) -> set[str]:
        return set(self.checkpoint.tensors) if self.checkpoint is not None else set()


@dataclass(frozen=True)
class Check:
    name: str
    why: str
    problem: Callable[[CheckContext], str | None]  # None: passed


_CONVERT = "run `dsv4 convert EXPORT DST [--graft-from RELEASE]` and serve DST"


def _quant_config(ctx: CheckContext) -> dict:
    qc = ctx.config.get("quantization_config")
    return qc if isinstance(qc, dict) else {}


def _not_modelopt(ctx: CheckContext) -> str | None:
    method = str(_quant_config(ctx).get("quant_method", ""))
    if not method.lower().startswith("modelopt"):
        return None
    return (
        f"quantization_config.quant_method is {method!r}: a raw ModelOpt export (or its config). vLLM "
        "would build every linear layer as NVFP4, which DeepSeek V4 cannot load (the seeds' S7-S15); "
        f"{_CONVERT} (only the config wrong and the tensors already native: `dsv4 fix-config CKPT`)"
    )


def _mixed_layout(ctx: CheckContext) -> str | None:
    qc = _quant_config(ctx)
    if not qc:
        return (
            "config.json has no quantization_config: an unquantized (BF16) checkpoint. dsv4 serve serves "
            f"NVFP4 conversions: `dsv4 quantize` it, then {_CONVERT}"
        )
    method, algo = qc.get("quant_method"), str(qc.get("moe_quant_algo") or "").upper()
    if method == "fp8" and algo == "NVFP4":
        return None
    if method == "fp8":
        return (
            "quantization_config is quant_method fp8 without moe_quant_algo NVFP4: the release layout "
            "(MXFP4 routed experts), not an NVFP4 conversion; serve the release with vLLM's own recipe, "
            f"or quantize it and {_CONVERT}"
        )
    return f"quantization_config.quant_method is {method!r}; the mixed FP8 + NVFP4 layout has 'fp8'"


def _architecture(ctx: CheckContext) -> str | None:
    archs = ctx.config.get("architectures") or []
    if "DeepseekV4ForCausalLM" in archs:
        return None
    from patches.vllm_plugin import ARCHITECTURE

    if ARCHITECTURE in archs:
        return (
            f"architectures is {archs!r}: an export opted into the dsv4 vLLM plugin (dsv4 use-plugin). dsv4 "
            "serve serves converted checkpoints; serve this one with `vllm serve` and the flags in "
            "docs/plugin.md, or convert it (dsv4 convert) and serve that"
        )
    return f"architectures is {archs!r}, not DeepseekV4ForCausalLM"


def _native_names(ctx: CheckContext) -> str | None:
    hf = sorted(k for k in ctx.keys if k.startswith(("model.", "lm_head.")))
    if not hf:
        return None
    return f"{len(hf)} tensor(s) under transformers' names, e.g. {hf[0]}: a raw export; {_CONVERT}"


def _target_layout(ctx: CheckContext) -> str | None:
    try:
        # a config written for vLLM 0.33 has mlp_layer_types, not num_hash_layers: list the tensors from
        # the release-style fields fix-config restores, as convert does
        want = M.target_layout(layout_config(ctx.config))
    except (KeyError, TypeError, ValueError) as err:
        return f"config.json does not describe a DeepSeek V4 layout ({type(err).__name__}: {err})"
    have = ctx.checkpoint.tensors if ctx.checkpoint is not None else {}
    missing = sorted(want.keys() - have.keys())
    extra = sorted(have.keys() - want.keys())
    wrong = sorted(
        k
        for k in want.keys() & have.keys()
        if (have[k].dtype, tuple(have[k].shape)) != (want[k].dtype, want[k].shape)
    )
    if not (missing or extra or wrong):
        return None
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensor(s) missing, e.g. {missing[0]} ({want[missing[0]].dtype})")
    if extra:
        parts.append(f"{len(extra)} not in the layout, e.g. {extra[0]}")
    if wrong:
        k = wrong[0]
        parts.append(
            f"{len(wrong)} with another dtype/shape, e.g. {k}: {have[k].dtype} {list(have[k].shape)}, "
            f"expected {want[k].dtype} {list(want[k].shape)}"
        )
    return "not the layout dsv4 convert writes for this config.json: " + "; ".join(parts)


def _config_fixed(ctx: CheckContext) -> str | None:
    from pipeline.vllm_config.files import plan_fix  # reads tensor headers: imports torch

    target = ctx.settings.target_vllm
    try:
        result = plan_fix(ctx.settings.ckpt, target)  # the same rules as `dsv4 fix-config`
    except DsV4Error as err:
        return f"config.json cannot be checked against vLLM {target}'s rules: {err}"
    if not result.changed:
        return None
    rules = sorted({c.rule for c in result.changes})
    return (
        f"config.json is not what vLLM {target} loads (fix-config rules {', '.join(rules)} would change "
        f"it); run `dsv4 fix-config {ctx.settings.ckpt} --target-vllm {target}`"
    )


def tokenizer_dir(settings: ServeSettings) -> Path | None:
    """Where vLLM reads the tokenizer (--tokenizer, else the checkpoint), if it has one there."""
    d = settings.ckpt if settings.tokenizer is None else settings.tokenizer
    return Path(d) if any((Path(d) / f).is_file() for f in TOKENIZER_FILES) else None


def _tokenizer(ctx: CheckContext) -> str | None:
    s = ctx.settings
    if tokenizer_dir(s) is not None:
        return None
    if s.tokenizer is not None:
        return f"no tokenizer ({' or '.join(TOKENIZER_FILES)}) in --tokenizer {s.tokenizer}"
    return (
        f"no tokenizer ({' or '.join(TOKENIZER_FILES)}) in {s.ckpt}: vLLM loads it from the model directory "
        "at start-up; pass --tokenizer RELEASE (the release has one) or copy the release's tokenizer files "
        "into the checkpoint"
    )


def _heads(ctx: CheckContext) -> str | None:
    heads, tp = ctx.config.get("num_attention_heads"), ctx.settings.tensor_parallel_size
    if not isinstance(heads, int) or heads % tp == 0:
        return None
    return (
        f"tensor parallel size {tp} ({ctx.settings.tp_reason}) does not divide num_attention_heads {heads}: "
        f"vLLM refuses it at start-up; pass --tensor-parallel-size with a divisor of {heads}"
    )


def _max_len(ctx: CheckContext) -> str | None:
    limit, want = ctx.config.get("max_position_embeddings"), ctx.settings.max_model_len
    if want <= 0:
        return f"--max-model-len {want}: must be positive"
    if isinstance(limit, int) and want > limit:
        return f"--max-model-len {want} exceeds max_position_embeddings {limit}"
    return None


def _mtp(ctx: CheckContext) -> str | None:
    if ctx.settings.mtp_tokens <= 0:
        return None
    nextn = ctx.config.get("num_nextn_predict_layers") or 0
    tensors = sorted(k for k in ctx.keys if k.startswith("mtp."))
    if nextn > 0 and tensors:
        return None
    return (
        f"--mtp {ctx.settings.mtp_tokens}: the checkpoint has no MTP block (num_nextn_predict_layers "
        f"{nextn}, {len(tensors)} mtp.* tensors): convert with --graft-from RELEASE to keep it, or serve "
        "without --mtp"
    )


# Checked from config.json alone, before reading any shard; the first failure stops.
CONFIG_CHECKS: tuple[Check, ...] = (
    Check("modelopt", "a raw ModelOpt export's config (quant_method modelopt) is refused", _not_modelopt),
    Check("mixed layout", "quant_method fp8 + moe_quant_algo NVFP4 (DeepseekV4FP8Config)", _mixed_layout),
    Check("architecture", "vLLM's DeepSeek V4 model class", _architecture),
)
# Checked after `dsv4 validate`'s checks passed; all failures are reported together.
CHECKPOINT_CHECKS: tuple[Check, ...] = (
    Check("native names", "dsv4 convert writes the release's names, not transformers'", _native_names),
    Check("layout", "exactly pipeline.mapping.target_layout(config): names, dtypes, shapes", _target_layout),
    Check("vLLM config", "config.json unchanged by fix-config's rules for the target vLLM", _config_fixed),
    Check("tokenizer", "vLLM needs a tokenizer at start-up", _tokenizer),
    Check("tensor parallel", "the tensor parallel size divides the attention heads", _heads),
    Check("max model len", "within max_position_embeddings", _max_len),
    Check("mtp", "--mtp only with an MTP block in the checkpoint", _mtp),
)
