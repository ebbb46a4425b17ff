"""`dsv4 calibrate` refuses bad inputs before any model exists (no ModelOpt needed to get there): each
refusal is one line naming the file (and key or line), and leaves nothing beside AMAX. Also the command
line: every option reaches the step as it was given."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.calibrate import CalibrateOptions, calibrate_release
from pipeline.calibrate.amax_file import write_amax
from pipeline.cli import main as dsv4
from pipeline.errors import DsV4Error

pytestmark = pytest.mark.unit


def _refused(release: Path, amax: Path, match: str, **options) -> None:
    before = sorted(p.name for p in amax.parent.iterdir()) if amax.parent.is_dir() else None
    with pytest.raises(DsV4Error, match=match):
        calibrate_release(release, amax, CalibrateOptions(device="cpu", progress=False, **options))
    after = sorted(p.name for p in amax.parent.iterdir()) if amax.parent.is_dir() else None
    assert after == before  # no work folder, log or lock left behind


def test_amax_inside_the_release_is_refused(tiny_release):
    _refused(tiny_release, tiny_release / "amax.safetensors", "refusing to write AMAX inside the release")
    _refused(tiny_release, tiny_release / "sub" / "a.safetensors", "inside the release")


def test_a_bf16_copy_is_not_a_release(tiny_bf16, tmp_path):
    _refused(tiny_bf16, tmp_path / "out" / "a.safetensors", "dsv4 calibrate needs a release FP8.MXFP4")


def test_a_folder_without_a_checkpoint_is_not_a_release(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "out").mkdir()
    _refused(tmp_path / "empty", tmp_path / "out" / "a.safetensors", "empty: no model.safetensors.index.json")


@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        ("missing.jsonl", None, "missing.jsonl: calibration file not found"),
        ("bad.jsonl", "{not json\n", r"bad.jsonl:1: not JSON"),
        (
            "ids.jsonl",
            json.dumps({"input_ids": [1, 10**9]}) + "\n",
            "token id 1000000000 is outside the vocabulary",
        ),
        (
            "obj.jsonl",
            json.dumps({"tokens": [1]}) + "\n",
            r"obj.jsonl:1: expected an object with input_ids or text",
        ),
    ],
)
def test_a_bad_calibration_file_is_refused_naming_it(tiny_release, tmp_path, name, text, match):
    calib = tmp_path / name
    if text is not None:
        calib.write_text(text)
    (tmp_path / "out").mkdir()
    _refused(tiny_release, tmp_path / "out" / "a.safetensors", match, calib_file=calib)


def test_amax_must_be_a_file_and_an_existing_one_needs_overwrite(tiny_release, tmp_path):
    (tmp_path / "dir.safetensors").mkdir()
    _refused(tiny_release, tmp_path / "dir.safetensors", "is a directory")
    ours = tmp_path / "ours.safetensors"
    write_amax(ours, {"model.layers.0.q": torch.tensor(1.0)}, {"recipe": "experts"})
    _refused(tiny_release, ours, "exists; pass --overwrite")
    foreign = tmp_path / "foreign.safetensors"
    foreign.write_bytes(b"someone's file")
    _refused(tiny_release, foreign, "refusing --overwrite: not an AMAX file", overwrite=True)
    assert foreign.read_bytes() == b"someone's file"


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"recipe": "all"}, "--recipe 'all'"),
        ({"samples": 0}, "--samples 0"),
        ({"seq_len": -1}, "--seq-len -1"),
    ],
)
def test_bad_options_are_refused(tiny_release, tmp_path, options, match):
    _refused(tiny_release, tmp_path / "a.safetensors", match, **options)


def test_every_option_reaches_the_step(monkeypatch, tmp_path, capsys):
    import pipeline.calibrate as calibrate

    seen = {}

    def fake(release, amax, opts):
        seen.update(release=release, amax=amax, opts=opts)
        return calibrate.CalibrateReport(
            str(release),
            str(amax),
            opts.recipe,
            {"samples": 8, "seq_len": 256},
            "cpu",
            4,
            amax_keys=124,
            complete=True,
        )

    import pipeline.quantize_checks

    monkeypatch.setattr(pipeline.quantize_checks, "require_quant_env", lambda step: None)
    monkeypatch.setattr(calibrate, "calibrate_release", fake)
    argv = ["calibrate", "REL", "A.safetensors", "--recipe", "full", "--calib", "c.jsonl", "--samples", "8"]
    argv += ["--seq-len", "256", "--batch", "2", "--seed", "3", "--device", "cpu", "--restart", "--quiet"]
    assert dsv4(argv) == 0
    assert seen["release"] == Path("REL") and seen["amax"] == Path("A.safetensors")
    assert seen["opts"] == CalibrateOptions(
        recipe="full",
        calib_file=Path("c.jsonl"),
        samples=8,
        seq_len=256,
        batch=2,
        seed=3,
        device="cpu",
        overwrite=False,
        restart=True,
        progress=False,
    )
    assert "calibrate: A.safetensors (full): 124 amax from 4 layers" in capsys.readouterr().out


def test_the_defaults_are_dsv4_quantizes(monkeypatch):
    """Same options, same batches: the defaults must be dsv4 quantize's (its QuantizeOptions)."""
    from pipeline.quantize import QuantizeOptions

    q, c = QuantizeOptions(), CalibrateOptions()
    assert (c.recipe, c.samples, c.seq_len, c.batch, c.seed, c.device) == (
        q.recipe,
        q.calib_size,
        q.calib_seq,
        q.calib_batch,
        q.seed,
        q.device,
    )
