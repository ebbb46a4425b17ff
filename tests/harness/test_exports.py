"""harness.exports.build_synthetic_export: a ModelOpt-like NVFP4 export with real values, for testing
`dsv4 convert` without ModelOpt.

Its input is the micro tiny model through `dsv4 dequant` (tests/conftest.py's session-scoped BF16 copy;
only read here). Its key set is tied to ``export_tensors`` (itself checked against a real ModelOpt 0.47
export in test_mapping.py) and to pipeline.mapping's plan; its values to the BF16 weights and, byte for
byte, to the real ModelOpt 0.47.0 export of the same model.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from harness.exports import (
    DIALECTS,
    RECIPES,
    TO,
    build_synthetic_export,
    export_tensors,
)
from harness.tiny import write_checkpoint_dir
from pipeline import mapping as M
from pipeline.checkpoint import Checkpoint
from pipeline.formats import nvfp4_dequantize, nvfp4_global_scale

pytestmark = pytest.mark.unit

# every recipe and dialect, both modes (experts H 'shared' has the key set of experts H 'separate')
BUILDS = [
    ("full", "H", "shared"),
    ("full", "X", "shared"),
    ("experts", "X", "shared"),
    ("experts", "H", "separate"),
    ("experts", "N", "shared"),
]
assert {d for _, d, _ in BUILDS} == set(DIALECTS) and {r for r, _, _ in BUILDS} == set(RECIPES)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Small tensors: one thread is faster, and a contended OpenMP pool on the shared 2-core machine is
    several times slower (as in tests/conftest.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bf16(_tiny_bf16_master: Path) -> Path:
    return _tiny_bf16_master


@pytest.fixture(scope="module")
def export(exports):
    """export(recipe, dialect, w13_global) -> the built directory: the session's builds (tests/conftest.py),
    shared with the convert tests."""
    return exports


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def _source(bf16: Path) -> dict[str, torch.Tensor]:
    return dict(Checkpoint.open(bf16).iter_tensors())


def _modules(tensors: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k.removesuffix(".weight_scale_2") for k in tensors if k.endswith(".weight_scale_2"))


# ---- key set: export_tensors, and pipeline.mapping plans it --------------------------------------


@pytest.mark.parametrize(("recipe", "dialect", "w13_global"), BUILDS)
def test_tensors_are_export_tensors_and_plan(recipe, dialect, w13_global, export, bf16):
    out = export(recipe, dialect, w13_global)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "hf_quant_config.json",
        "model.safetensors",
    ]
    ck = Checkpoint.open(out)
    triples = sorted((k, i.dtype, i.shape) for k, i in ck.tensors.items())
    assert triples == export_tensors(_config(bf16), recipe, dialect)
    assert not [k for k, _, _ in triples if k.startswith("mtp.") or ".mtp." in k]
    if dialect == "N":
        return  # pipeline.mapping reads N as the converted layout itself, MTP included: not an export
    # the mapping table plans it: every key maps, and together they write the converted layout
    p = M.plan(triples, ck.config)
    assert p.dialect == dialect and len(p.mappings) == len(triples)


# ---- values --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("recipe", "dialect", "w13_global"), [("full", "X", "shared"), ("experts", "H", "separate")]
)
def test_nvfp4_weights_dequantize_close_to_the_bf16_source(recipe, dialect, w13_global, export, bf16):
    """Each element within one quantization step of its source, per tensor relative error < 0.2.

    Why one step: the block scale S is e4m3(block_amax / (6 * ws2)), rounded to nearest with relative
    error <= 2^-4 (3 mantissa bits, normal range), so |x| / (S * ws2) <= 6 * 16/15 = 6.4; the E2M1 grid's
    largest gap is 2 (between 4 and 6), so rounding moves x/(S*ws2) by at most 1, and saturating
    6.4 -> 6 by 0.4. Hence |dequant - x| <= S * ws2 (plus float32 rounding). Why 0.2: that bound allows
    up to ~0.18 * block_amax per element, but rounding errors spread over the gaps; the measured
    relative Frobenius error is 0.06-0.10 here, while a global scale off by 2x gives > 0.9 and swapped
    nibbles > 1.3.
    """
    out = load_file(export(recipe, dialect, w13_global) / "model.safetensors")
    src = _source(bf16)
    inverse = {TO[dialect](k): k for k in src}
    modules = _modules(out)
    assert len(modules) == (90 if recipe == "full" else 48)
    for m in modules:
        x = src[inverse[f"{m}.weight"]].float()
        scale, ws2 = out[f"{m}.weight_scale"], out[f"{m}.weight_scale_2"]
        assert float(scale.float().min()) >= 2.0**-6, m  # normal e4m3 block scales: the bound's premise
        deq = nvfp4_dequantize(out[f"{m}.weight"], scale, ws2, torch.float32)
        step = (scale.float() * ws2).repeat_interleave(16, dim=-1)
        assert bool(((deq - x).abs() <= step * (1 + 1e-6)).all()), m
        rel = float((deq - x).norm() / x.norm())
        assert rel < 0.2, (m, rel)


def test_weights_equal_the_real_modelopt_047_export_byte_for_byte(export):
    """The real `dsv4 e2e` export of this model (ModelOpt 0.47.0 + transformers 5.23.0 on a CPU, seed 0;
    its weights, block scales and global scales hashed here) has the same NVFP4 bytes: the builder
    reproduces ModelOpt's quantization and its grouping of global scales. Only input_scale is synthetic.
    If harness/tiny.py's weights change on purpose, this pin has to be re-derived from a new real export."""
    real = {
        "full": "ff66f27e6f2c9295dbb719ab4e8bc20cc80efcdb166f2db096cc641be1d39de3",
        "experts": "92e27a6bf64e06e9a7a46eda7674168dc904160635ccc55c850d5ad2037fa857",
    }
    for recipe, digest in real.items():
        t = load_file(export(recipe, "X") / "model.safetensors")
        h = hashlib.sha256()
        for m in _modules(t):
            for s in (".weight", ".weight_scale", ".weight_scale_2"):
                h.update(f"{m}{s}".encode())
                h.update(t[m + s].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        assert h.hexdigest() == digest, recipe


def test_shared_global_scales_follow_modelopt_047(export):
    """'shared': linears that read one tensor share weight_scale_2 and input_scale; routed experts of a
    layer share input_scale per projection but each expert has its own w1/w3 weight_scale_2."""
    t = load_file(export("full", "X") / "model.safetensors")
    config = _config(export("full", "X"))

    def ws2(m):
        return t[f"model.{m}.weight_scale_2"]

    def inp(m):
        return t[f"model.{m}.input_scale"]

    for i in range(config["num_hidden_layers"]):
        a = f"layers.{i}.attn"
        optional = (
            "compressor.wkv",
            "compressor.wgate",
            "indexer.compressor.wkv",
            "indexer.compressor.wgate",
        )
        optional += ("indexer.weights_proj",)
        reads_x = [f"{a}.wq_a", f"{a}.wkv"]
        reads_x += [f"{a}.{n}" for n in optional if f"model.{a}.{n}.weight_scale_2" in t]
        groups = [
            reads_x,
            [f"{a}.wq_b"] + ([f"{a}.indexer.wq_b"] if f"model.{a}.indexer.wq_b.weight" in t else []),
        ]
        groups.append([f"layers.{i}.ffn.shared_experts.w1", f"layers.{i}.ffn.shared_experts.w3"])
        experts = range(config["n_routed_experts"])
        groups += [[f"layers.{i}.ffn.experts.{e}.w1", f"layers.{i}.ffn.experts.{e}.w3"] for e in experts]
        for g in groups:
            assert all(torch.equal(ws2(m), ws2(g[0])) and torch.equal(inp(m), inp(g[0])) for m in g), g
        for w in ("w1", "w3", "w2"):
            first = inp(f"layers.{i}.ffn.experts.0.{w}")
            assert all(torch.equal(inp(f"layers.{i}.ffn.experts.{e}.{w}"), first) for e in experts)
        assert len({float(ws2(g[0])) for g in groups}) > 1  # not one scale for everything
    # per expert, not per layer (the real export: layer 2 experts 0 and 1, amax 0.375 and 0.25)
    assert float(ws2("layers.2.ffn.experts.0.w1")) == float(nvfp4_global_scale(0.375))
    assert float(ws2("layers.2.ffn.experts.1.w1")) == float(nvfp4_global_scale(0.25))
    assert 4.0 / 2688 < float(inp("layers.0.attn.wq_a")) < 16.0 / 2688  # synthetic amax in [2, 16)


def test_separate_global_scales_are_each_tensors_own(export, bf16):
    t = load_file(export("experts", "H", "separate") / "model.safetensors")
    src = _source(bf16)
    inverse = {TO["H"](k): k for k in src}
    for m in _modules(t):
        assert torch.equal(
            t[f"{m}.weight_scale_2"], nvfp4_global_scale(src[inverse[f"{m}.weight"]].abs().amax())
        )
    experts = {
        re.sub(r"\.(gate|up)_proj$", "", m) for m in _modules(t) if m.endswith((".gate_proj", ".up_proj"))
    }
    differ = [
        e
        for e in experts
        if not torch.equal(t[f"{e}.gate_proj.weight_scale_2"], t[f"{e}.up_proj.weight_scale_2"])
    ]
    assert differ, "no expert's w1 and w3 weight_scale_2 differ"
    assert len({float(t[f"{m}.input_scale"]) for m in _modules(t)}) == len(_modules(t))


def test_other_tensors_keep_their_values_norms_as_float32(export, bf16):
    out = load_file(export("experts", "X") / "model.safetensors")
    src = _source(bf16)
    nvfp4 = {
        f"{m}{s}"
        for m in _modules(out)
        for s in (".weight", ".weight_scale", ".weight_scale_2", ".input_scale")
    }
    norms = 0
    for native, x in src.items():
        key = TO["X"](native)
        if native.startswith("mtp.") or key in nvfp4:
            continue
        y = out[key]
        if native.endswith("norm.weight"):
            norms += 1
            assert y.dtype == torch.float32 and x.dtype == torch.bfloat16, native
        else:
            assert y.dtype == x.dtype, native
        assert torch.equal(y, x.to(y.dtype)), native
    assert norms > 0 and out["model.layers.0.ffn.gate.tid2eid"].dtype == torch.int64


def test_config_is_the_input_plus_modelopts_quantization_config(export, bf16):
    source = _config(bf16)
    ignore_full = ["lm_head", "model.embed_tokens"] + [f"model.layers.{i}.ffn.gate" for i in range(4)]
    ignore_experts = ["lm_head", "model.embed_tokens"]
    for i in range(4):
        ignore_experts += [f"model.layers.{i}.{m}" for m in ("ffn.gate", "ffn.shared_experts*", "attn*")]
    for recipe, ignore in (("full", ignore_full), ("experts", ignore_experts)):
        out = export(recipe, "X")
        config = _config(out)
        # the real ModelOpt 0.47.0 export's quantization_config (micro model), key for key
        assert config.pop("quantization_config") == {
            "config_groups": {
                "group_0": {
                    "input_activations": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16},
                    "weights": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16},
                    "targets": ["Linear"],
                }
            },
            "ignore": ignore,
            "quant_algo": "NVFP4",
            "producer": {"name": "modelopt", "version": "0.47.0"},
            "quant_method": "modelopt",
        }
        assert config == {k: v for k, v in source.items() if k != "quantization_config"}
        assert (
            json.loads((out / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"]
            == ignore
        )
    h = _config(export("experts", "H"))["quantization_config"]["ignore"]
    layer0 = ["model.layers.0.mlp.gate", "model.layers.0.mlp.shared_experts*", "model.layers.0.self_attn*"]
    assert h[:5] == ["lm_head", "model.embed_tokens", *layer0]


def test_same_inputs_give_byte_identical_files(export, bf16, tmp_path):
    first = export("experts", "X")
    again = build_synthetic_export(bf16, tmp_path / "again", recipe="experts", dialect="X")
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (again / name).read_bytes(), name
    other_seed = build_synthetic_export(bf16, tmp_path / "seed1", recipe="experts", dialect="X", seed=1)
    a, b = (
        load_file(export("experts", "X") / "model.safetensors"),
        load_file(other_seed / "model.safetensors"),
    )
    k = "model.layers.0.ffn.experts.0.w1"
    assert torch.equal(a[f"{k}.weight"], b[f"{k}.weight"]) and not torch.equal(
        a[f"{k}.input_scale"], b[f"{k}.input_scale"]
    )


# ---- refusals --------------------------------------------------------------------------------------


def test_refuses_bad_arguments_and_inputs(bf16, tmp_path):
    with pytest.raises(ValueError, match="recipe must be one of"):
        build_synthetic_export(bf16, tmp_path / "x", recipe="fp8")
    with pytest.raises(ValueError, match="w13_global must be one of"):
        build_synthetic_export(bf16, tmp_path / "x", w13_global="fused")
    tensors = _source(bf16)
    config = _config(bf16)
    # every expert's w3 a copy of its w1: 'separate' could not give them different global scales
    same = {k: tensors[k.replace(".w3.", ".w1.")].clone() if ".w3." in k else t for k, t in tensors.items()}
    with pytest.raises(ValueError, match="no w1/w3 weight_scale_2 differ"):
        build_synthetic_export(
            write_checkpoint_dir(tmp_path / "same", config, same), tmp_path / "y", w13_global="separate"
        )
    # a release-layout leftover (an FP8 tile scale) is not a BF16 checkpoint
    extra = {**tensors, "layers.0.attn.wq_a.scale": torch.ones(1, 2, dtype=torch.float8_e8m0fnu)}
    with pytest.raises(ValueError, match=r"unexpected \['layers\.0\.attn\.wq_a\.scale'\]"):
        build_synthetic_export(write_checkpoint_dir(tmp_path / "extra", config, extra), tmp_path / "z")
