"""A reference forward pass through transformers' own DeepseekV4ForCausalLM, in float32 on a CPU.

transformers 5.23 reads the release layout (dialect N, BRIEF §3) directly through its conversion
mapping for ``deepseek_v4`` (renames, and w1/w3/w2 of every expert merged into the fused 3-D
``gate_up_proj`` / ``down_proj``), so it is an independent reader of our checkpoints:

* a **release-quantized** directory (FP8 block weights with UE8M0 ``.scale``, MXFP4 experts) loads with
  ``quantization_config=FineGrainedFP8Config(dequantize=True)``: transformers dequantizes every
  weight itself (``Fp8Dequantize``: FP8 tiles, and int8-packed E2M1 with a [1, 32] block derived
  from the scale grid);
* a **BF16** directory (the same native names, no scales) loads plainly.

What the loader does beyond calling ``from_pretrained`` (each reported in :class:`LoadReport`):

* For a BF16 directory whose config.json still carries the release's ``quantization_config``, that
  entry is dropped from the in-memory config (never from the directory): with it, transformers would
  set up the FP8 quantizer for a checkpoint that has no scales.
* transformers 5.23, loading with the FP8 quantizer in dequantize mode, leaves every *unquantized*
  ``.weight`` tensor (embedding, norms, router gate, compressor/indexer projections) in its stored
  BF16 even when float32 is asked for: those keys pass through the quantizer's ``Fp8Dequantize``
  converter, which returns a weight without a scale untouched, and
  ``HfQuantizer.get_new_dtype`` skips the cast for converters that carry a quantizer op. The
  forward then fails (``expected m1 and m2 to have the same dtype``). The loader upcasts those
  parameters to ``dtype`` after loading; BF16 -> float32 is exact, so the values are the ones a
  correct cast gives. The report lists them.
* ``mtp.*`` keys are dropped by transformers by design (``_keys_to_ignore_on_load_unexpected``;
  the MTP block is not instantiated), without appearing among the unexpected keys; the report lists
  them as ``ignored_keys``.
* An FP8 or int8-packed weight without its ``.scale`` is refused before loading: transformers 5.23
  would load it unscaled and report nothing (its ``Fp8Dequantize`` passes a lone weight through).

Needs transformers 5.23 and, for the quantized path, ``accelerate`` (transformers'
``FineGrainedFP8HfQuantizer.validate_environment`` refuses to run without it, even to dequantize).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

RELEASE_QUANTIZED = "release-quantized"
BF16 = "bf16"


@dataclass
class LoadReport:
    """What transformers did with a checkpoint directory."""

    kind: str  # RELEASE_QUANTIZED or BF16
    missing_keys: list[str]
    unexpected_keys: list[str]
    mismatched_keys: list[tuple]
    error_msgs: list[str]
    ignored_keys: list[str]  # checkpoint keys transformers drops by design (mtp.*)
    config_edits: list[str] = field(default_factory=list)  # in-memory edits to config.json
    upcast: list[str] = field(default_factory=list)  # params transformers left in another dtype

    @property
    def clean(self) -> bool:
        return not (self.missing_keys or self.unexpected_keys or self.mismatched_keys or self.error_msgs)


class ReferenceLoadError(RuntimeError):
    pass


def _checkpoint_keys(path: Path) -> dict[str, str]:
    """{key: safetensors dtype} over every shard of ``path`` (headers only)."""
    out: dict[str, str] = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open objects are not iterable
                out[key] = f.get_slice(key).get_dtype()
    if not out:
        raise ReferenceLoadError(f"{path}: no *.safetensors files")
    return out


_QUANTIZED_DTYPES = ("F8_E4M3", "I8")  # FP8 block and MXFP4-packed weights of the release


def unscaled_weights(keys: dict[str, str]) -> list[str]:
    """FP8 / int8-packed ``.weight`` keys without a ``.scale`` sibling.

    transformers 5.23 loads such a weight *silently* and unscaled: its ``Fp8Dequantize`` returns a
    weight without a scale untouched and reports no missing key (tests/e2e/test_reference.py checks this)."""
    return sorted(
        k
        for k, dt in keys.items()
        if dt in _QUANTIZED_DTYPES and not (k.endswith(".weight") and k[: -len(".weight")] + ".scale" in keys)
    )


def checkpoint_kind(path: str | os.PathLike, keys: dict[str, str] | None = None) -> str:
    """RELEASE_QUANTIZED when some ``.weight`` has a UE8M0 ``.scale`` sibling, else BF16."""
    keys = _checkpoint_keys(Path(path)) if keys is None else keys
    quantized = any(
        k.endswith(".scale") and dt == "F8_E8M0" and k[: -len(".scale")] + ".weight" in keys
        for k, dt in keys.items()
    )
    return RELEASE_QUANTIZED if quantized else BF16


def _require(module: str, why: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ReferenceLoadError(f"the reference loader needs the Python package {module!r}: {why}")


def load_reference(
    path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, strict: bool = True
) -> tuple[torch.nn.Module, LoadReport]:
    """Build transformers' DeepseekV4ForCausalLM from a release-layout directory, on the CPU, in eval mode.

    The directory is read, never written. ``strict``: raise :class:`ReferenceLoadError` unless
    transformers reports no missing, unexpected or mismatched key."""
    _require("transformers", "the reference forward is transformers' DeepseekV4ForCausalLM (5.23)")
    import transformers
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    root = Path(path)
    keys = _checkpoint_keys(root)
    kind = checkpoint_kind(root, keys)
    unscaled = unscaled_weights(keys)
    if unscaled:
        raise ReferenceLoadError(
            f"{root}: {len(unscaled)} FP8/MXFP4 weight(s) without a .scale sibling, e.g. {unscaled[:3]}; "
            "transformers would load them unscaled without a word"
        )
    raw = json.loads((root / "config.json").read_text())
    edits: list[str] = []
    kwargs: dict = {}
    if kind == BF16:
        if "quantization_config" in raw:
            raw.pop("quantization_config")
            edits.append("dropped quantization_config (the checkpoint has no scales)")
    else:
        _require(
            "accelerate",
            "transformers' FP8 quantizer refuses to load (even to dequantize) without it; "
            "pip install accelerate==1.15.0 (the tox quant env must list it)",
        )
        qc = raw.get("quantization_config") or {}
        if qc.get("quant_method") != "fp8":
            raise ReferenceLoadError(
                f"{root}: FP8/MXFP4 tensors but config.json quantization_config is {qc!r}, not the release's fp8"
            )
        kwargs["quantization_config"] = transformers.FineGrainedFP8Config(
            dequantize=True,
            weight_block_size=qc.get("weight_block_size", [128, 128]),
            scale_fmt=qc.get("scale_fmt", "ue8m0"),
            activation_scheme=qc.get("activation_scheme", "dynamic"),
        )
    config = DeepseekV4Config.from_dict(raw)
    model, info = DeepseekV4ForCausalLM.from_pretrained(
        root, config=config, dtype=dtype, output_loading_info=True, **kwargs
    )
    model.eval()
    # Parameters transformers left below the requested precision (the FP8-quantizer bug above);
    # never downcast: at dtype=bfloat16 the _keep_in_fp32_modules_strict ones stay float32 by design.
    upcast = []
    for name, param in model.named_parameters():
        if param.is_floating_point() and param.dtype.itemsize < dtype.itemsize:
            param.data = param.data.to(dtype)
            upcast.append(name)
    ignore = [re.compile(p) for p in (model._keys_to_ignore_on_load_unexpected or [])]
    ignored = sorted(k for k in keys if any(p.search(k) for p in ignore))
    report = LoadReport(
        kind=kind,
        missing_keys=sorted(info["missing_keys"]),
        unexpected_keys=sorted(info["unexpected_keys"]),
        mismatched_keys=sorted(info["mismatched_keys"]),
        error_msgs=list(info["error_msgs"]),
        ignored_keys=ignored,
        config_edits=edits,
        upcast=upcast,
    )
    if strict and not report.clean:
        raise ReferenceLoadError(
            f"{root} ({kind}): transformers reported missing {report.missing_keys[:5]}, unexpected "
            f"{report.unexpected_keys[:5]}, mismatched {report.mismatched_keys[:5]}, errors {report.error_msgs[:3]}"
        )
    return model, report


def reference_batch(vocab: int, seed: int, batch: int = 4, seq: int = 32) -> torch.Tensor:
    """A fixed [batch, seq] int64 token batch, uniform over the vocabulary, from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g, dtype=torch.int64)


@torch.no_grad()
def logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Float32 logits [batch, seq, vocab] of a full (stateless, no-cache) forward."""
    return model(input_ids=tokens, use_cache=False).logits.float()


def compare(logits_a: torch.Tensor, logits_b: torch.Tensor) -> dict[str, float]:
    """{"kl": mean over positions of KL(softmax(a) || softmax(b)), "top1": argmax agreement fraction}."""
    if logits_a.shape != logits_b.shape:
        raise ValueError(f"compare: logits shapes differ: {tuple(logits_a.shape)} vs {tuple(logits_b.shape)}")
    a = torch.log_softmax(logits_a.double(), dim=-1)
    b = torch.log_softmax(logits_b.double(), dim=-1)
    kl = (a.exp() * (a - b)).sum(dim=-1)
    top1 = (logits_a.argmax(dim=-1) == logits_b.argmax(dim=-1)).double()
    return {"kl": float(kl.mean()), "top1": float(top1.mean())}
