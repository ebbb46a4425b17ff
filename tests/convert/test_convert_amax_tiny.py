"""`dsv4 convert RELEASE --amax AMAX` against today's path, on real ModelOpt 0.47 exports of the micro model.

Today's path is `dsv4 dequant` -> `dsv4 quantize` -> `dsv4 convert`; the amax file is the calibration
snapshot that very `dsv4 quantize` run kept (``<export>.calibration/amax.safetensors``), which is the
format `dsv4 calibrate` writes. For each recipe the two outputs must be the same bytes: every shard, the
index, config.json and hf_quant_config.json. Only these differ, by design:

* dsv4-convert-report.json: it records how the output was made (rule table, sources, the amax file);
* the journal (.dsv4-progress.json): it fingerprints its own inputs;
* dsv4-quantize-report.json and generation_config.json: files of the export that today's convert copies
  (the quantize run's report; transformers' generation config), which the release path has no export to
  copy from (it copies the release's own files instead).

NVIDIA's format: the same values written as ptq.py's per-rank dumps (w1 = w3 = the gate_up weight amax,
w2 the down one, every expert's input amax the layer's shared one, experts split over 2 ranks) give the
same checkpoint.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from harness.checkpoints import PATH_SPECIFIC_FILES, differing_files
from pipeline.checkpoint import JOURNAL_NAME
from pipeline.convert import REPORT_NAME, convert_checkpoint

pytestmark = [pytest.mark.tiny, pytest.mark.quant]

# files the two paths write differently, by design (module docstring); everything else must be equal
BY_DESIGN = PATH_SPECIFIC_FILES


def test_the_path_specific_files_name_converts_own_report_and_journal():
    assert {REPORT_NAME, JOURNAL_NAME} <= BY_DESIGN


# (case, ModelOpt recipe, today's convert options, convert --amax options)
CASES = {
    "experts": ("experts", {"graft": True}, {"recipe": "experts"}),
    "transcode": (
        "experts",
        {"graft": True, "experts": "transcode"},
        {"recipe": "experts", "experts": "transcode"},
    ),
    "full": ("full", {}, {"recipe": "full"}),
}


def snapshot_amax(export: Path) -> Path:
    return export.with_name(export.name + ".calibration") / "amax.safetensors"


@pytest.fixture(scope="module")
def both_paths(modelopt_exports, micro_release, tmp_path_factory):
    """case -> (today's output, the --amax output)."""
    root = tmp_path_factory.mktemp("convert-amax")
    out = {}
    for case, (recipe, today, amax) in CASES.items():
        export = modelopt_exports[recipe]
        old = convert_checkpoint(
            export,
            root / f"today-{case}",
            graft_from=micro_release if today.get("graft") else None,
            experts=today.get("experts"),
            progress=False,
        ).out_dir
        new = convert_checkpoint(
            micro_release, root / f"amax-{case}", amax=snapshot_amax(export), progress=False, **amax
        ).out_dir
        out[case] = (old, new)
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_convert_from_release_and_amax_writes_todays_bytes(both_paths, case):
    old, new = both_paths[case]
    assert differing_files(old, new) <= BY_DESIGN
    # the comparison is not vacuous: the shards and configs exist on both sides
    for name in ("config.json", "hf_quant_config.json", "model.safetensors.index.json"):
        assert (new / name).is_file() and (old / name).is_file()
    assert list(new.glob("*.safetensors"))


def test_the_files_that_differ_are_only_those_by_design(both_paths):
    old, new = both_paths["experts"]
    assert differing_files(old, new) == BY_DESIGN  # today's path copies the export's two extra files


def test_the_full_recipe_writes_no_mtp_block_as_today(both_paths):
    _, new = both_paths["full"]
    config = json.loads((new / "config.json").read_text())
    keys = json.loads((new / "model.safetensors.index.json").read_text())["weight_map"]
    assert config["num_nextn_predict_layers"] == 0 and not any(k.startswith("mtp.") for k in keys)
    _, experts = both_paths["experts"]
    keys = json.loads((experts / "model.safetensors.index.json").read_text())["weight_map"]
    assert any(k.startswith("mtp.") for k in keys)  # the experts recipe grafts it, as --graft-from does


def write_nvidia_dumps(amax_file: Path, folder: Path, ranks: int = 2) -> Path:
    """Our snapshot's values as NVIDIA ptq.py's per-rank dumps: per expert, w1 = w3 = the gate_up weight
    amax, w2 the down one; every expert's input amax the layer's shared value; experts split by rank."""
    ours = load_file(amax_file)
    n_experts = 1 + max(int(k.rsplit(".", 1)[1]) for k in ours if "_weight_quantizers." in k)
    per_rank = n_experts // ranks
    dumps: list[dict[str, torch.Tensor]] = [{} for _ in range(ranks)]
    fused = re.compile(
        r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)_(weight|input)_quantizers?(?:\.(\d+))?"
    )
    for key, value in ours.items():
        m = fused.fullmatch(key)
        assert m is not None, key  # the experts recipe quantizes only the routed experts
        layer, param, kind, expert = m.groups()
        experts = [int(expert)] if expert is not None else range(n_experts)
        for e in experts:
            for w in ("w1", "w3") if param == "gate_up_proj" else ("w2",):
                dumps[e // per_rank][f"layers.{layer}.ffn.experts.{e}.{w}_{kind}_quantizer._amax"] = (
                    value.clone()
                )
    folder.mkdir()
    for r, d in enumerate(dumps):
        torch.save(d, folder / f"amax_dict_rank{r}-mp{ranks}.pt")
    return folder


@pytest.mark.parametrize("experts", ["requantize", "transcode"])
def test_nvidia_amax_dumps_of_the_same_values_give_the_same_checkpoint(
    both_paths, modelopt_exports, micro_release, tmp_path, experts
):
    dumps = write_nvidia_dumps(snapshot_amax(modelopt_exports["experts"]), tmp_path / "nvidia")
    assert len(list(dumps.iterdir())) == 2
    out = convert_checkpoint(micro_release, tmp_path / "out", amax=dumps, experts=experts, progress=False)
    _, ours = both_paths["experts" if experts == "requantize" else "transcode"]
    assert differing_files(ours, out.out_dir) == {REPORT_NAME, JOURNAL_NAME, "hf_quant_config.json"}
    # NVIDIA's dumps do not say which ModelOpt calibrated them: hf_quant_config.json's producer entry
    # says "unknown" where our snapshot's report names 0.47.0; nothing else in it differs (vLLM reads
    # neither: config.json's quantization_config decides)
    mine, theirs = (json.loads((d / "hf_quant_config.json").read_text()) for d in (ours, out.out_dir))
    assert mine.pop("producer")["version"] != "unknown" and theirs.pop("producer") == {
        "name": "modelopt",
        "version": "unknown",
    }
    assert mine == theirs
    assert json.loads((out.out_dir / REPORT_NAME).read_text())["amax"]["format"] == "nvidia"
