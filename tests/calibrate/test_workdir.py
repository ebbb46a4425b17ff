"""The work folder that makes `dsv4 calibrate` resumable (pipeline/calibrate/workdir.py), with no ModelOpt:
commit order, what a resume keeps and refuses, and the merge into one AMAX dict."""

from __future__ import annotations

import json

import pytest
import torch

import pipeline.calibrate.workdir as workdir
from pipeline.calibrate.workdir import MANIFEST, WorkDir, manifest_differences, work_dir_for
from pipeline.errors import DsV4Error

pytestmark = pytest.mark.unit


def _manifest(**changes) -> dict:
    base = {
        "format": workdir.MANIFEST_FORMAT,
        "release": "/r",
        "inputs": [
            {"path": "/r/a.safetensors", "size": 10, "mtime_ns": 1},
            {"path": "/r/config.json", "size": 3},
        ],
        "recipe": "experts",
        "calibration": {"samples": 16, "seq_len": 64},
        "versions": {"nvidia-modelopt": "0.47.0"},
    }
    return base | changes


def _amax(layer: int, value: float = 1.0) -> dict[str, torch.Tensor]:
    return {
        f"model.layers.{layer}.mlp.experts.down_proj_input_quantizer": torch.tensor(value),
        f"model.layers.{layer}.mlp.experts.down_proj_weight_quantizers.0": torch.tensor(value / 2),
    }


def _hidden(n: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    return [torch.randn(2, 5, 4, 8, generator=g).to(torch.bfloat16) for _ in range(n)]


def test_the_work_folder_sits_beside_amax_hidden(tmp_path):
    assert work_dir_for(tmp_path / "v4.amax.safetensors") == tmp_path / ".v4.amax.safetensors.work"


def test_a_new_folder_starts_at_layer_0_and_records_its_manifest(tmp_path):
    work = WorkDir(tmp_path / "w")
    assert work.open(_manifest()) == 0
    assert json.loads((work.path / MANIFEST).read_text()) == _manifest()


def test_committed_layers_resume_with_their_outputs_bit_for_bit(tmp_path):
    work = WorkDir(tmp_path / "w")
    work.open(_manifest())
    out0, out1 = _hidden(), _hidden(3)
    work.commit_layer(0, _amax(0), {"fallbacks": []}, out0)
    work.commit_layer(1, _amax(1, 3.0), {"fallbacks": [{"quantizer": "q"}]}, out1)
    assert WorkDir(tmp_path / "w").open(_manifest()) == 2
    back = work.hidden(2, torch.device("cpu"))
    assert [h.dtype for h in back] == [torch.bfloat16] * 3
    assert all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(back, out1, strict=True))
    assert not (work.path / "hidden-0001.safetensors").exists()  # a committed layer's inputs are dropped
    amax, metas = work.merged(2)
    assert list(amax) == sorted(_amax(0) | _amax(1))
    assert metas == [{"fallbacks": []}, {"fallbacks": [{"quantizer": "q"}]}]


def test_a_crash_between_the_outputs_and_the_amax_keeps_only_the_layers_before(tmp_path, monkeypatch):
    """The next layer's inputs are written before the layer's amax file (the commit): a crash between the
    two leaves the layer uncommitted, and the resume redoes it from its own inputs, still on disk."""
    work = WorkDir(tmp_path / "w")
    work.open(_manifest())
    work.commit_layer(0, _amax(0), {}, _hidden())
    real = workdir.write_bytes_atomic

    def crash_on_amax(path, data):
        if path.name.startswith("layer-"):
            raise OSError("killed")
        real(path, data)

    monkeypatch.setattr(workdir, "write_bytes_atomic", crash_on_amax)
    with pytest.raises(OSError):
        work.commit_layer(1, _amax(1), {}, _hidden(3))
    monkeypatch.undo()
    assert (work.path / "hidden-0002.safetensors").is_file()  # written first ...
    assert WorkDir(work.path).open(_manifest()) == 1  # ... but layer 1 is not committed
    assert (work.path / "hidden-0001.safetensors").is_file()  # so its inputs are still there


def test_the_last_layer_writes_no_outputs(tmp_path):
    work = WorkDir(tmp_path / "w")
    work.open(_manifest())
    work.commit_layer(0, _amax(0), {}, None)
    assert sorted(p.name for p in work.path.iterdir()) == ["layer-0000.safetensors", MANIFEST]


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"recipe": "full"}, "recipe: was 'experts', now 'full'"),
        ({"calibration": {"samples": 128, "seq_len": 64}}, "calibration.samples: was 16, now 128"),
        (
            {
                "inputs": [
                    {"path": "/r/a.safetensors", "size": 11, "mtime_ns": 1},
                    {"path": "/r/config.json", "size": 3},
                ]
            },
            "inputs: /r/a.safetensors.size: was 10, now 11",
        ),
        (
            {"inputs": [{"path": "/r/a.safetensors", "size": 10, "mtime_ns": 1}]},
            "inputs: /r/config.json: is gone",
        ),
        ({"versions": {"nvidia-modelopt": "0.48.0"}}, "versions.nvidia-modelopt: was '0.47.0', now '0.48.0'"),
    ],
)
def test_a_resume_with_other_inputs_or_options_is_refused_naming_the_change(tmp_path, change, named):
    work = WorkDir(tmp_path / "w")
    work.open(_manifest())
    work.commit_layer(0, _amax(0), {}, _hidden())
    with pytest.raises(DsV4Error, match="pass --restart") as err:
        WorkDir(work.path).open(_manifest(**change))
    assert named in str(err.value)
    assert WorkDir(work.path).open(_manifest(**change), restart=True) == 0  # --restart starts over
    assert not (work.path / "layer-0000.safetensors").exists()


def test_manifest_differences_name_every_leaf():
    assert manifest_differences(_manifest(), _manifest()) == []
    assert manifest_differences({"a": {"b": 1}}, {"a": {"b": 2, "c": 3}}) == [
        "a.b: was 1, now 2",
        "a.c: is new",
    ]


def test_a_gap_in_the_layer_files_is_damage(tmp_path):
    work = WorkDir(tmp_path / "w")
    work.open(_manifest())
    work.commit_layer(0, _amax(0), {}, _hidden())
    work.commit_layer(1, _amax(1), {}, _hidden())
    (work.path / "layer-0000.safetensors").unlink()
    with pytest.raises(DsV4Error, match=r"layer-0001.safetensors: layer 0 has no amax file before it"):
        WorkDir(work.path).open(_manifest())


def test_a_committed_layer_without_the_next_inputs_is_damage(tmp_path):
    work = WorkDir(tmp_path / "w")
    work.open(_manifest())
    work.commit_layer(0, _amax(0), {}, _hidden())
    (work.path / "hidden-0001.safetensors").unlink()
    with pytest.raises(DsV4Error, match=r"hidden-0001\.safetensors: missing"):
        work.hidden(1, torch.device("cpu"))


def test_a_folder_dsv4_did_not_write_is_neither_resumed_nor_emptied(tmp_path):
    foreign = tmp_path / "w"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DsV4Error, match=f"{MANIFEST}: not a work folder dsv4 calibrate wrote"):
        WorkDir(foreign).open(_manifest())
    with pytest.raises(DsV4Error, match=r"holds notes\.txt, which dsv4 calibrate did not write"):
        WorkDir(foreign).open(_manifest(), restart=True)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_a_manifest_of_another_format_is_refused(tmp_path):
    work = WorkDir(tmp_path / "w")
    work.open(_manifest())
    (work.path / MANIFEST).write_text(json.dumps(_manifest(format=99)))
    with pytest.raises(DsV4Error, match="key format: 99"):
        WorkDir(work.path).open(_manifest())


def test_two_layers_claiming_one_key_are_refused_at_the_merge(tmp_path):
    work = WorkDir(tmp_path / "w")
    work.open(_manifest())
    work.commit_layer(0, _amax(0), {}, _hidden())
    work.commit_layer(1, _amax(0), {}, _hidden())
    with pytest.raises(DsV4Error, match=r"layer-0001\.safetensors: key model\.layers\.0\.mlp"):
        work.merged(2)
