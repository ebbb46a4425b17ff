"""Synthetic ModelOpt NVFP4 exports with real data, and the key sets of the export dialects (BRIEF §3).

Two parts:

* The inverse name functions native key -> dialect H / X (``to_h``, ``to_x``, ``TO``) and
  ``export_tensors(config, recipe, dialect)``: every (key, dtype, shape) a ModelOpt export of
  ``config`` holds. They are derived from the release layout independently of pipeline.mapping's rule
  table (ordered string replacements, the way transformers' conversion mapping spells them), and
  tests/mapping/test_mapping.py checks them against real artefacts committed as fixtures: a real ModelOpt
  0.47.0 + transformers 5.23.0 export of the micro tiny model (both recipes) and transformers 5.23.0's
  own DeepseekV4ForCausalLM state dict.

* ``build_synthetic_export(bf16_dir, out_dir, ...)``: a directory that looks like a ModelOpt export of
  a BF16 checkpoint in native names (``dsv4 dequant``'s output), with exactly the tensors
  ``export_tensors`` lists and real values (pipeline.formats.nvfp4_quantize of the BF16 weights), so
  that ``dsv4 convert`` can be tested in the unit tier without ModelOpt. Global scales follow ModelOpt
  (see ``_weight_group``); activation scales are synthetic (see ``_synthetic_amax``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeline.checkpoint import Checkpoint, from_torch, to_torch
from pipeline.formats import nvfp4_global_scale, nvfp4_quantize
from pipeline.release_layout import FP8, PLAIN, release_weights

RECIPES = ("experts", "full")
DIALECTS = ("N", "H", "X")
W13_GLOBALS = ("shared", "separate")
EXPORT_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
HF_QUANT_CONFIG_NAME = "hf_quant_config.json"
MODELOPT_VERSION = "0.47.0"
NVFP4_SUFFIXES = (".weight", ".weight_scale", ".weight_scale_2", ".input_scale")

# ---- the inverse functions: native key -> H / X ---------------------------------------------------

# native -> transformers names, in transformers 5.23 conversion_mapping's order (its "deepseek_v4"
# renamings, written out again here), then ModelOpt 0.45's per-expert split names.
_TO_H = (
    (r"^embed\.weight$", "model.embed_tokens.weight"),
    (r"^head\.weight$", "lm_head.weight"),
    (r"^hc_head_(fn|base|scale)$", r"model.hc_head.hc_\1"),
    (r"\.attn\.", ".self_attn."),
    (r"\.ffn\.", ".mlp."),
    (r"\.indexer\.compressor\.", ".compressor.indexer."),
    (r"\.attn_norm\.", ".input_layernorm."),
    (r"\.ffn_norm\.", ".post_attention_layernorm."),
    (r"\.hc_(attn|ffn)_(fn|base|scale)$", r".\1_hc.\2"),
    (r"\.attn_sink$", ".sinks"),
    (r"\.indexer\.weights_proj\.", ".compressor.indexer.scorer.weights_proj."),
    (r"\.indexer\.wq_b\.", ".compressor.indexer.q_b_proj."),
    (r"\.norm\.", ".kv_norm."),
    (r"\.ape$", ".position_bias"),
    (r"\.wq_a\.", ".q_a_proj."),
    (r"\.self_attn\.wq_b\.", ".self_attn.q_b_proj."),
    (r"\.wkv\.", ".kv_proj."),
    (r"\.wgate\.", ".gate_proj."),
    (r"\.wo_a\.", ".o_a_proj."),
    (r"\.wo_b\.", ".o_b_proj."),
    (r"\.q_norm\.", ".q_a_norm."),
    (r"\.gate\.bias$", ".gate.e_score_correction_bias"),
    (r"\.w1\.", ".gate_proj."),
    (r"\.w2\.", ".down_proj."),
    (r"\.w3\.", ".up_proj."),
)


_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)")


def _per_role(fn):
    """fn computed once per role (indices replaced), the indices put back: the full-size tests derive
    288k keys. The renames never depend on an index's value."""
    cache: dict[str, str] = {}

    def wrapped(key: str) -> str:
        indices = _INDEX.findall(key)
        it = iter(f"<{i}>" for i in range(len(indices)))
        canonical = _INDEX.sub(lambda _: next(it), key)
        if canonical not in cache:
            cache[canonical] = fn(canonical.replace("<", "9999").replace(">", "0"))
        out = cache[canonical]
        for i, index in enumerate(indices):
            out = out.replace(f"9999{i}0", index)
        return out

    return wrapped


@_per_role
def to_h(native: str) -> str:
    key = native
    for pat, rep in _TO_H:
        key = re.sub(pat, rep, key)
    # transformers renames the checkpoint's keys, then they live under the model. prefix
    return "model." + key if key.startswith(("layers.", "norm.")) else key


@_per_role
def to_x(native: str) -> str:
    """ModelOpt 0.47 + transformers 5.23: native under model., with the reversal's exceptions."""
    if native == "head.weight":
        return native
    key = {"embed.weight": "embed_tokens.weight"}.get(native, native)
    key = re.sub(r"^hc_head_(fn|base|scale)$", r"hc_head.hc_\1", key)
    key = re.sub(r"\.attn\.kv_norm\.weight$", ".attn.norm.weight", key)
    return "model." + key


TO = {"N": lambda k: k, "H": to_h, "X": to_x}

# Linear modules of transformers' model that ModelOpt quantizes with NVFP4_DEFAULT_CFG (every
# nn.Linear but the grouped wo_a and the router gate); names are native.
_LINEAR = re.compile(
    r"\.(attn\.(wq_a|wq_b|wkv|wo_b)|attn\.(indexer\.)?compressor\.(wkv|wgate)|attn\.indexer\.(wq_b|weights_proj)"
    r"|ffn\.shared_experts\.w[123])$"
)
_EXPERT = re.compile(r"\.ffn\.experts\.\d+\.w[123]$")
_F32_NORM = re.compile(r"(norm\.weight)$")  # transformers 5.23 exports RMSNorm weights as float32


def _nvfp4(name: str, rows: int, cols: int) -> list[tuple[str, str, tuple[int, ...]]]:
    return [
        (f"{name}.input_scale", "F32", ()),
        (f"{name}.weight", "U8", (rows, cols // 2)),
        (f"{name}.weight_scale", "F8_E4M3", (rows, cols // 16)),
        (f"{name}.weight_scale_2", "F32", ()),
    ]


def export_tensors(config: dict, recipe: str, dialect: str) -> list[tuple[str, str, tuple[int, ...]]]:
    """The (key, dtype, shape) a ModelOpt export of ``config`` holds, in ``dialect``'s names: no MTP
    block (transformers has none), routed experts NVFP4; recipe 'full' also makes every other
    nn.Linear NVFP4 (wo_a stays BF16), 'experts' leaves them BF16; norms float32."""
    out = []
    for w in release_weights(config):
        if w.name.startswith("mtp."):
            continue
        native: list[tuple[str, str, tuple[int, ...]]]
        if _EXPERT.search(w.name) or (recipe == "full" and _LINEAR.search(w.name)):
            native = _nvfp4(w.name, *w.shape)
        elif w.fmt == FP8:
            native = [(f"{w.name}.weight", "BF16", w.shape)]
        elif w.fmt == PLAIN and re.search(
            r"\.(compressor\.(wkv|wgate)|indexer\.weights_proj)\.weight$", w.name
        ):
            if recipe == "full":
                native = _nvfp4(w.name.removesuffix(".weight"), *w.shape)
            else:
                native = [(w.name, "BF16", w.shape)]
        else:
            dtype = "F32" if _F32_NORM.search(w.name) else w.dtype
            native = [(w.name, dtype, w.shape)]
        out += [(TO[dialect](k), d, s) for k, d, s in native]
    return sorted(out)


# ---- global scales: which NVFP4 linears share one ---------------------------------------------------

# ModelOpt 0.47 (modelopt/torch/export/unified_export_hf.py, requantize_resmooth_fused_llm_layers):
# before export, a dummy forward finds the quantized linears that read the same input tensor, and
# preprocess_linear_fusion gives each such group the max of its weight amaxes (so one weight_scale_2)
# and the max of its input amaxes (one input_scale); experts.E groups found on one expert are repeated
# for every other expert index. Checked against the real micro export (/tmp/e2e, full recipe): per
# layer, wq_a, wkv, compressor.{wkv,wgate}, indexer.compressor.{wkv,wgate} and indexer.weights_proj
# share one weight_scale_2 (all read the attention's normed input), wq_b and indexer.wq_b share one
# (both read q_norm(wq_a(x))), shared_experts w1/w3 share one, and each routed expert's own w1/w3 pair
# shares one -- distinct experts of one layer keep distinct weight_scale_2 (seen: layer 2 expert 0 vs
# 1, layer 1 expert 3's w2). wo_b and w2 stand alone. Names are native module names. The routed
# experts' pairs come from transformers 5.23 holding each expert's gate and up as one fused
# gate_up_proj slice with one weight quantizer per expert (modelopt/torch/export/moe_utils.py,
# _export_fused_experts). With these groups the NVFP4 bytes equal the real export's (test_exports.py).
_SHARED_INPUT = (
    (
        re.compile(
            r"^(layers\.\d+\.attn)\.(wq_a|wkv|compressor\.(wkv|wgate)|indexer\.compressor\.(wkv|wgate)"
            r"|indexer\.weights_proj)$"
        ),
        r"\1:input",
    ),
    (re.compile(r"^(layers\.\d+\.attn)\.(wq_b|indexer\.wq_b)$"), r"\1:qr"),
    (re.compile(r"^(layers\.\d+\.ffn\.shared_experts)\.w[13]$"), r"\1:w13"),
    (re.compile(r"^(layers\.\d+\.ffn\.experts\.\d+)\.w[13]$"), r"\1:w13"),
)
# Routed experts of a layer share one input_scale per projection (w1/w3, and w2): _export_fused_experts
# has one input quantizer per projection type, shared across all experts (seen in the real export too).
_EXPERT_INPUT = re.compile(r"^(layers\.\d+\.ffn\.experts)\.\d+\.(w[13]|w2)$")


def _weight_group(module: str, w13_global: str) -> str:
    """The group whose max weight amax gives ``module`` its weight_scale_2. 'separate' (the seeds'
    ModelOpt 0.45 export): every tensor its own, so w1 and w3 of one expert may differ."""
    if w13_global == "shared":
        for pattern, group in _SHARED_INPUT:
            if pattern.match(module):
                return pattern.sub(group, module)
    return module


def _input_group(module: str, w13_global: str) -> str:
    """The group that shares ``module``'s input_scale. 'separate': every tensor its own, so even w1 and
    w3 of one expert differ (a calibrated 0.45 export would give them equal ones, since both read the
    same activations; vLLM takes the max of the two either way, so a converter must not assume it)."""
    if w13_global == "shared":
        m = _EXPERT_INPUT.match(module)
        if m:
            return f"{m.group(1)}:{'w2' if m.group(2) == 'w2' else 'w13'}"
    return _weight_group(module, w13_global)


def _synthetic_amax(seed: int, group: str) -> float:
    """A made-up activation amax in [2, 16) for one input group, from sha256(seed, group): SYNTHETIC,
    not calibrated (no forward runs here). The range brackets the real micro export's calibrated
    values (input_scale 0.0009-0.0043, i.e. amax 2.4-11.6)."""
    digest = hashlib.sha256(f"{seed}/activation-amax/{group}".encode()).digest()
    return 2.0 + 14.0 * int.from_bytes(digest[:8], "little") / 2.0**64


# ---- config ---------------------------------------------------------------------------------------


def _ignore(config: dict, recipe: str, dialect: str) -> list[str]:
    """ModelOpt's `ignore` list (the modules left unquantized), in the real 0.47 export's order and, for
    X, its spelling (transformers module names: lm_head, model.embed_tokens, model.layers.N.ffn.gate);
    for H and N the same modules in that dialect's names."""

    def module(native: str) -> str:
        return TO[dialect](f"{native}.weight").removesuffix(".weight")

    out = ["head" if dialect == "N" else "lm_head", module("embed")]
    for i in range(config["num_hidden_layers"]):
        out.append(module(f"layers.{i}.ffn.gate"))
        if recipe == "experts":
            out += [module(f"layers.{i}.ffn.shared_experts.w1").rsplit(".", 1)[0] + "*"]
            out += [module(f"layers.{i}.attn.wq_a").rsplit(".", 1)[0] + "*"]
    return out


def modelopt_quantization_config(config: dict, recipe: str, dialect: str = "X") -> dict:
    """The `quantization_config` ModelOpt 0.47 writes into config.json (key order as in the real export)."""
    fp4 = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}
    return {
        "config_groups": {
            "group_0": {"input_activations": dict(fp4), "weights": dict(fp4), "targets": ["Linear"]}
        },
        "ignore": _ignore(config, recipe, dialect),
        "quant_algo": "NVFP4",
        "producer": {"name": "modelopt", "version": MODELOPT_VERSION},
        "quant_method": "modelopt",
    }


def modelopt_hf_quant_config(quantization_config: dict) -> dict:
    """The hf_quant_config.json ModelOpt 0.47 writes beside an NVFP4 export with that config.json
    quantization_config (the real micro export's, key for key)."""
    return {
        "producer": quantization_config["producer"],
        "quantization": {
            "quant_algo": "NVFP4",
            "kv_cache_quant_algo": None,
            "group_size": 16,
            "exclude_modules": quantization_config["ignore"],
        },
    }


# ---- the builder ----------------------------------------------------------------------------------


def build_synthetic_export(
    bf16_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    recipe: str = "experts",
    dialect: str = "X",
    w13_global: str = "shared",
    seed: int = 0,
    hf_ptq_mtp: bool = False,
) -> Path:
    """Write a synthetic ModelOpt NVFP4 export of the BF16 checkpoint ``bf16_dir`` (native names, e.g.
    ``dsv4 dequant``'s output) to ``out_dir``; return it.

    ``out_dir`` gets ``model.safetensors`` holding exactly ``export_tensors(config, recipe, dialect)``
    (asserted), ``config.json`` (the input's, plus ModelOpt's ``quantization_config``) and
    ``hf_quant_config.json``. ``dialect``: 'X' (ModelOpt 0.47 + transformers 5.23), 'H' (the seeds'
    ModelOpt 0.45 export: transformers names, experts split per expert) or 'N' (native names, for
    completeness only: pipeline.mapping reads N as the converted layout, MTP included, and does not
    plan an export without MTP). Values:

    * NVFP4 tensors: ``nvfp4_quantize`` of the BF16 weight with ``weight_scale_2`` = amax / (6*448),
      amax the max over the tensor's ``_weight_group`` (w13_global 'shared', ModelOpt 0.47) or the
      tensor's own (w13_global 'separate', ModelOpt 0.45; at least one expert's w1 and w3 must then
      differ, or ValueError). ``input_scale`` = a SYNTHETIC activation amax (``_synthetic_amax``, seeded
      by ``seed``, not calibrated) / (6*448), shared as ModelOpt shares it in 'shared' mode.
    * Everything else as in the input, RMSNorm weights cast to float32 (transformers 5.23 exports them
      so; BF16 -> F32 is exact); no ``mtp.*`` keys (transformers has no MTP module).

    ``hf_ptq_mtp`` (dialect X only): also carry the input's ``mtp.*`` tensors unchanged under their
    native names, as ModelOpt's examples/hf_ptq re-attaches the MTP block (example_utils.load_mtp_weights;
    seen in a real hf_ptq export of the micro model on a GPU).

    Same inputs give byte-identical files. Runs on one torch thread (restored after): the tensors are
    small, and on a shared 2-core machine a contended OpenMP pool made a build 10x slower (1.4 s, not 0.14).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _build(Path(bf16_dir), Path(out_dir), recipe, dialect, w13_global, seed, hf_ptq_mtp)
    finally:
        torch.set_num_threads(threads)


def _build(
    bf16_dir: Path, out_path: Path, recipe: str, dialect: str, w13_global: str, seed: int, hf_ptq_mtp: bool
) -> Path:
    if hf_ptq_mtp and dialect != "X":
        raise ValueError(
            "build_synthetic_export: hf_ptq_mtp is an hf_ptq (ModelOpt 0.47, dialect X) behaviour"
        )
    for name, value, allowed in (
        ("recipe", recipe, RECIPES),
        ("dialect", dialect, DIALECTS),
        ("w13_global", w13_global, W13_GLOBALS),
    ):
        if value not in allowed:
            raise ValueError(f"build_synthetic_export: {name} must be one of {allowed}; got {value!r}")
    src = Checkpoint.open(bf16_dir)
    if src.config is None:
        raise ValueError(f"{bf16_dir}: no config.json")
    config = src.config
    tensors = dict(src.iter_tensors())

    native = export_tensors(config, recipe, "N")
    modules = [k.removesuffix(".weight_scale_2") for k, _, _ in native if k.endswith(".weight_scale_2")]
    derived = {f"{m}{s}" for m in modules for s in NVFP4_SUFFIXES}
    used = {f"{m}.weight" for m in modules} | {k for k, _, _ in native if k not in derived}
    unused = sorted(k for k in tensors.keys() - used if not k.startswith("mtp."))
    missing = sorted(used - tensors.keys())
    if unused or missing:
        raise ValueError(
            f"{bf16_dir}: not a BF16 checkpoint in native names for its config: "
            f"missing {missing[:5]}, unexpected {unused[:5]}"
        )

    out: dict[str, torch.Tensor] = {}
    weights = {m: tensors[f"{m}.weight"] for m in modules}
    for m, w in weights.items():
        if w.dtype != torch.bfloat16 or w.ndim != 2:
            raise ValueError(f"{bf16_dir}: {m}.weight is {from_torch(w.dtype)} {list(w.shape)}, not 2-D BF16")
    group_amax: dict[str, torch.Tensor] = {}
    for m, w in weights.items():
        g = _weight_group(m, w13_global)
        amax = w.abs().amax().float()
        group_amax[g] = torch.maximum(group_amax[g], amax) if g in group_amax else amax
    global_scale = {g: nvfp4_global_scale(a) for g, a in group_amax.items()}
    if w13_global == "separate":
        pairs = [m.removesuffix(".w1") for m in modules if _EXPERT.search(m) and m.endswith(".w1")]
        if not any(not torch.equal(global_scale[f"{p}.w1"], global_scale[f"{p}.w3"]) for p in pairs):
            raise ValueError(
                f"{bf16_dir}: w13_global='separate' but every expert's w1 and w3 have the same amax, so "
                "no w1/w3 weight_scale_2 differ; the export would not exercise the w13 unification"
            )
    for m, w in weights.items():
        packed, scale, ws2 = nvfp4_quantize(w, weight_scale_2=global_scale[_weight_group(m, w13_global)])
        out[f"{m}.weight"], out[f"{m}.weight_scale"], out[f"{m}.weight_scale_2"] = packed, scale, ws2.clone()
        out[f"{m}.input_scale"] = nvfp4_global_scale(_synthetic_amax(seed, _input_group(m, w13_global)))

    for key, dtype, shape in native:
        if key in derived:
            continue
        t = tensors[key]
        have = from_torch(t.dtype)
        if tuple(t.shape) != shape or (have != dtype and (have, dtype) != ("BF16", "F32")):
            raise ValueError(
                f"{bf16_dir}: {key} is {have} {list(t.shape)}; the export needs {dtype} {list(shape)}"
            )
        out[key] = t.to(to_torch(dtype))

    renamed = {TO[dialect](k): t.contiguous() for k, t in out.items()}
    got = sorted((k, from_torch(t.dtype), tuple(t.shape)) for k, t in renamed.items())
    want = export_tensors(config, recipe, dialect)
    if got != want:
        diff = sorted(set(got) ^ set(want))
        raise AssertionError(f"synthetic export differs from export_tensors: {diff[:5]}")
    if hf_ptq_mtp:  # native names but for the export's kv_norm -> norm reversal, as on the GPU run
        renamed.update(
            {
                to_x(k).removeprefix("model."): t.contiguous()
                for k, t in tensors.items()
                if k.startswith("mtp.")
            }
        )

    quant = modelopt_quantization_config(config, recipe, dialect)
    out_config = {k: copy.deepcopy(v) for k, v in config.items() if k != "quantization_config"}
    out_config["quantization_config"] = quant
    hf_quant = modelopt_hf_quant_config(quant)
    out_path.mkdir(parents=True, exist_ok=True)
    save_file(dict(sorted(renamed.items())), out_path / EXPORT_NAME, metadata={"format": "pt"})
    # as ModelOpt writes them: indent 4, no newline at the end
    (out_path / CONFIG_NAME).write_text(json.dumps(out_config, indent=4))
    (out_path / HF_QUANT_CONFIG_NAME).write_text(json.dumps(hf_quant, indent=4))
    return out_path


def as_transformers_export(config: dict) -> dict:
    """What transformers >= 5.8 saves for a release-style config (configuration_deepseek_v4.py, 5.23):
    layer_types/compress_rates/mlp_layer_types instead of compress_ratios/num_hash_layers, YaRN nested
    under rope_parameters.compress, partial_rotary_factor next to qk_rope_head_dim."""
    c = copy.deepcopy(config)
    n = c["num_hidden_layers"]
    names = {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}
    c["layer_types"] = [names[r] for r in c.pop("compress_ratios")[:n]]
    c["compress_rates"] = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
    h = c.pop("num_hash_layers")
    c["mlp_layer_types"] = ["hash_moe"] * min(n, h) + ["moe"] * max(0, n - h)
    prf = c["qk_rope_head_dim"] / c["head_dim"]
    c["partial_rotary_factor"] = prf
    yarn = c.pop("rope_scaling")
    c["rope_parameters"] = {
        "main": {"rope_type": "default", "rope_theta": c["rope_theta"], "partial_rotary_factor": prf},
        "compress": {
            **yarn,
            "rope_theta": c["compress_rope_theta"],
            "rope_type": "yarn",
            "partial_rotary_factor": prf,
            "attention_factor": 1.0,
        },
    }
    return c
