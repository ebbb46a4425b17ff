"""Fixtures of the tiny tier: the micro release checkpoint, its BF16 copy made by `dsv4 dequant`, and both loaded
into transformers (session-scoped; tests only read them)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from harness.tiny import build_tiny_release
from pipeline.dequant import dequantize_checkpoint


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny forwards are faster on one thread, and on a shared 2-core machine a contended OpenMP pool
    made them 5-10x slower (seen: the tier took 50 s instead of 7 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def micro_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_release(tmp_path_factory.mktemp("micro-release"), "micro", seed=0)


@pytest.fixture(scope="session")
def micro_bf16(micro_release: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The micro release through `dsv4 dequant` itself: the tier checks that transformers loads the
    step's real output."""
    out = tmp_path_factory.mktemp("micro-bf16") / "bf16"
    return dequantize_checkpoint(micro_release, out, progress=False).out_dir


@pytest.fixture(scope="session")
def micro_quantized_model(micro_release: Path):
    """(model, LoadReport) of the micro release loaded through transformers' FP8 dequantize path."""
    from harness.reference import load_reference

    return load_reference(micro_release, strict=False)


@pytest.fixture(scope="session")
def micro_bf16_model(micro_bf16: Path):
    """(model, LoadReport) of the BF16 dequantization of the micro release."""
    from harness.reference import load_reference

    return load_reference(micro_bf16, strict=False)


@pytest.fixture(scope="session")
def modelopt_exports(micro_bf16: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{recipe: real ModelOpt 0.47 export of the micro BF16 model} for both recipes (8 calibration
    samples of 32 tokens), made once by `dsv4 quantize`. Needs the quant env. Do not mutate."""
    from pipeline.quantize import QuantizeOptions, quantize_checkpoint

    root = tmp_path_factory.mktemp("modelopt-exports")
    out = {}
    for recipe in ("experts", "full"):
        quantize_checkpoint(
            micro_bf16, root / recipe, QuantizeOptions(recipe=recipe, calib_size=8, calib_seq=32)
        )
        out[recipe] = root / recipe
    return out
