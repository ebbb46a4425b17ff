"""The hf_ptq driver against a REAL ModelOpt checkout: the recorded contract still describes its
hf_ptq.py, and locate/import/parse/conversions with Run 11's settings give args that main() can use and
that equal what hf_ptq's own ``__main__`` block produces.

Needs ModelOpt + transformers (hf_ptq imports them) and a checkout: the wheel ships no examples.
    git clone https://github.com/NVIDIA/Model-Optimizer /some/where
    git -C /some/where checkout <commit in fixtures/hf_ptq_contract.json "source">
    DSV4_MODELOPT_REPO=/some/where tox -e quant
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

import pytest

from pipeline import hf_ptq as drv

pytestmark = pytest.mark.quant


@pytest.fixture(scope="module")
def repo() -> Path:
    raw = os.environ.get("DSV4_MODELOPT_REPO")
    if not raw:
        commit = drv.load_contract()["source"]["commit"]
        pytest.skip(
            "DSV4_MODELOPT_REPO is not set: point it at a checkout of github.com/NVIDIA/Model-Optimizer "
            f"(git clone https://github.com/NVIDIA/Model-Optimizer && git checkout {commit}; the pip "
            "wheel ships no examples/)"
        )
    return Path(raw)


@pytest.fixture(scope="module")
def prepared(repo: Path):
    cfg = drv.seeds_config("/models/DeepSeek-V4-Pro-BF16", "/models/DeepSeek-V4-Pro-NVFP4")
    return drv.prepare(cfg, repo)


def test_recorded_contract_matches_the_real_hf_ptq(repo: Path):
    recorded = drv.load_contract()
    fresh = drv.extract_contract(drv.locate_hf_ptq(repo), resolve_runtime=True)
    diff = drv.contract_diff(recorded, fresh)
    assert not diff, (
        f"hf_ptq at {repo} differs from the recorded contract ({recorded['source']['commit']}); "
        "review, then regenerate with `python -m pipeline.hf_ptq $DSV4_MODELOPT_REPO`:\n" + "\n".join(diff)
    )


def test_seeds_config_parses_and_converts_on_the_real_hf_ptq(prepared):
    module, args, argv = prepared
    assert not set(argv) & {"--quant", "--calib", "--kv_cache_quant", "--tp"}
    assert args.qformat == "nvfp4"
    assert args.calib_size == [128] and all(type(n) is int for n in args.calib_size)
    assert args.calib_seq == 512
    assert args.dataset is None  # hf_ptq's load_model falls back to its documented mix
    assert args.kv_cache_qformat == "fp8_cast" and "fp8_cast" in module.KV_QUANT_CFG_CHOICES
    assert args.inference_tensor_parallel == 8
    assert args.gpu_max_mem_percentage == 0.7
    assert args.use_seq_device_map is True
    assert args.qformat in module.QUANT_CFG_CHOICES


def test_every_attribute_main_reads_is_on_the_real_parsed_args(prepared):
    _, args, _ = prepared
    contract = drv.load_contract()
    assert drv.missing_main_attributes(args, contract) == []
    assert {f["dest"] for f in contract["flags"]} <= set(vars(args))


def test_driver_args_equal_the_real_main_block(repo: Path, prepared, monkeypatch):
    """Run the real hf_ptq.py as __main__ with the driver's argv and no CUDA: its own block parses and
    converts, then main() raises OSError; the args it was called with must equal the driver's."""
    import torch

    _, ours, argv = prepared
    path = drv.locate_hf_ptq(repo)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", [str(path), *argv])
    with drv._folder_on_sys_path(path.parent), pytest.raises(OSError) as raised:
        runpy.run_path(str(path), run_name="__main__")
    tb = raised.value.__traceback__
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    theirs = next(f.f_locals["args"] for f in frames if f.f_code.co_name == "main")
    assert vars(theirs) == vars(ours)


def test_run_reaches_main_which_needs_cuda(repo: Path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(OSError, match="GPU"):
        drv.run(drv.seeds_config("/models/in", "/models/out"), repo)


def test_run3_load_model_goes_through_get_model_with_a_memory_cap(repo: Path):
    """Run 3: the driver leaves loading to hf_ptq.load_model (tests/quantize/test_hf_ptq_driver.py); this checks
    that, in the real checkout, load_model calls example_utils.get_model and get_model sets max_memory."""
    import ast

    folder = drv.locate_hf_ptq(repo).parent
    funcs = {}
    for name in ("hf_ptq.py", "example_utils.py"):
        tree = ast.parse((folder / name).read_text())
        funcs.update({(name, n.name): n for n in tree.body if isinstance(n, ast.FunctionDef)})
    load_model = funcs[("hf_ptq.py", "load_model")]
    calls = {
        n.func.id for n in ast.walk(load_model) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
    }
    assert "get_model" in calls
    get_model = funcs[("example_utils.py", "get_model")]
    assert "max_memory" in ast.unparse(get_model)


def test_recipe_qformats_are_modelopt_presets():
    from modelopt.recipe.presets import QUANT_CFG_CHOICES

    assert set(drv.RECIPE_QFORMAT.values()) <= set(QUANT_CFG_CHOICES)
