"""`dsv4 e2e`, the README's main job, runs the pipeline on the micro model and prints the recipe table."""

import re

import pytest

from pipeline.cli import main as dsv4

pytestmark = [pytest.mark.tiny, pytest.mark.quant]


def test_e2e_runs_every_step_and_scores_each_recipe(tmp_path, capsys):
    assert dsv4(["e2e", "--workdir", str(tmp_path / "work")]) == 0
    out = capsys.readouterr().out
    for step in (
        "dsv4 validate",
        "dsv4 calibrate --recipe experts",
        "dsv4 calibrate --recipe full",
        "dsv4 convert --amax --recipe experts ",
        "dsv4 convert --amax --recipe experts --experts transcode",
        "dsv4 convert --amax --recipe full",
        "dsv4 dequant",
        "dsv4 quantize --recipe experts",
        "dsv4 quantize --recipe full",
    ):
        assert step in out, step
    # the BF16 path ran beside the one-GPU path and wrote the same bytes (e2e stops when it does not)
    for name in ("experts", "transcode", "full"):
        assert f"the same bytes as the one-GPU path's vllm-{name}" in out, name
    assert out.index("dsv4 calibrate --recipe experts") < out.index("dsv4 quantize --recipe experts")
    table = dict(re.findall(r"^(experts|transcode|full)\s+([0-9.]+)\s+[0-9.]+$", out, flags=re.M))
    assert set(table) == {"experts", "transcode", "full"}
    assert float(table["transcode"]) <= float(table["experts"]) <= float(table["full"])
    assert float(table["experts"]) > 0
    assert (tmp_path / "work" / "nvfp4-experts" / "dsv4-quantize-report.json").is_file()
    for name in ("experts", "transcode", "full"):
        assert (tmp_path / "work" / f"vllm-{name}" / "dsv4-convert-report.json").is_file()
        assert (tmp_path / "work" / f"bf16-path-vllm-{name}" / "dsv4-convert-report.json").is_file()
    # dsv4 serve refuses the micro model (tests/e2e/test_e2e_claims.py): e2e must not call it servable
    assert "ready for" not in out and "not for serving: dsv4 serve refuses them" in out


def test_e2e_refuses_a_non_empty_workdir(tmp_path, capsys):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "x").write_text("")
    assert dsv4(["e2e", "--workdir", str(tmp_path / "work")]) == 2
    assert "not empty" in capsys.readouterr().err


def test_e2e_skip_bf16_path_runs_the_one_gpu_path_alone(tmp_path, capsys):
    assert dsv4(["e2e", "--skip-bf16-path", "--workdir", str(tmp_path / "work")]) == 0
    out = capsys.readouterr().out
    assert "dsv4 calibrate --recipe full" in out and "dsv4 quantize" not in out
    assert not (tmp_path / "work" / "nvfp4-experts").exists()
