"""The amax tables checked against the packages they describe (quant tier: ModelOpt 0.47, transformers 5.23):

* the name map: every quantizer `dsv4 quantize` records, for both recipes, names release modules the
  micro release has (pipeline.amax.names through pipeline.mapping's dialect-H rules);
* the shared-input groups (pipeline.amax.table.SHARE_RULES) are the groups ModelOpt's export finds with its
  own probe forward (collect_shared_input_modules) on the full recipe;
* transformers' config save (pipeline.mapping.transformers_config) is what AutoConfig writes for the
  micro release's config.json and for V4 Pro's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from harness.replica import REFERENCE_CONFIG, reference_missing
from pipeline.amax import load_table, read_amax, resolve_name
from pipeline.amax.table import SHARE_RULES, share_groups
from pipeline.checkpoint import Checkpoint
from pipeline.mapping.transformers_config import transformers_saved_config

pytestmark = [pytest.mark.tiny, pytest.mark.quant]


def snapshot_amax(export: Path) -> Path:
    return export.with_name(export.name + ".calibration") / "amax.safetensors"


@pytest.mark.parametrize("recipe", ["experts", "full"])
def test_every_recorded_quantizer_names_modules_of_the_release(modelopt_exports, micro_release, recipe):
    release = Checkpoint.open(micro_release)
    n_experts = release.config["n_routed_experts"]
    source = read_amax(snapshot_amax(modelopt_exports[recipe]))
    assert source.modelopt_version == "0.47.0"
    seen = set()
    for e in source.entries:
        for module in resolve_name(e.key, n_experts).modules:
            assert module + ".weight" in release.tensors, (e.key, module)
            seen.add(module)
    routed = {
        k.removesuffix(".weight") for k in release.tensors if ".ffn.experts." in k and k.endswith(".weight")
    }
    assert {m for m in routed if m.startswith("layers.")} <= seen  # every decoder layer's expert
    table = load_table(snapshot_amax(modelopt_exports[recipe]), n_experts)
    assert table.with_weight() == seen


def test_shared_input_groups_are_the_ones_modelopt_export_finds(micro_bf16, modelopt_exports):
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export.unified_export_hf import collect_shared_input_modules

    from pipeline.quantize import load_bf16_model
    from pipeline.recipes import recipe_config

    model = load_bf16_model(micro_bf16, torch.device("cpu"))
    with torch.no_grad():
        mtq.quantize(
            model, recipe_config("full"), lambda m: m(input_ids=torch.ones([1, 8], dtype=torch.long))
        )

    def probe():  # what ModelOpt's export runs (requantize_resmooth_fused_llm_layers)
        model(torch.ones([1, 2], dtype=torch.long))

    found, _ = collect_shared_input_modules(model, probe)
    n_experts = model.config.n_routed_experts
    theirs = sorted(
        sorted(resolve_name(m.name + ".weight_quantizer", n_experts).modules[0] for m in mods)
        for mods in found.values()
        if len(mods) > 1
    )
    modules = load_table(snapshot_amax(modelopt_exports["full"]), n_experts).with_weight()
    groups = share_groups(modules)
    ours = sorted(names for (rule, _), names in groups.items() if rule != "routed-w13" and len(names) > 1)
    assert theirs and ours == theirs
    assert {r.name for r in SHARE_RULES} == {rule for rule, _ in groups}  # every rule applies on micro


def _saved_by_transformers(config_path: Path, tmp_path: Path) -> dict:
    from transformers import AutoConfig

    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(config_path, src / "config.json")
    AutoConfig.from_pretrained(src).save_pretrained(tmp_path / "saved")
    return json.loads((tmp_path / "saved" / "config.json").read_text())


@pytest.mark.parametrize("which", ["micro", "v4-pro"])
def test_transformers_config_save_is_the_table(micro_release, tmp_path, which):
    if which == "v4-pro" and reference_missing():
        pytest.skip(reference_missing())
    path = micro_release / "config.json" if which == "micro" else REFERENCE_CONFIG
    theirs = _saved_by_transformers(path, tmp_path)
    ours = transformers_saved_config(json.loads(path.read_text()))
    # ModelOpt's export replaces quantization_config (and appends it last), fix-config rewrites it
    theirs.pop("quantization_config", None), ours.pop("quantization_config", None)
    assert json.dumps(ours) == json.dumps(theirs)  # key order too: it reaches the output's bytes
