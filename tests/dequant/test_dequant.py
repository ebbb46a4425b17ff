"""dsv4 dequant: release layout -> BF16, checked tensor by tensor, crash-safe, validate-first.

Expected values are computed here straight from the source bytes with pipeline.formats, independently
of the step's planning, threading and writing; tests/dequant/test_dequant_vs_transformers.py checks
the same output against transformers' own FP8/MXFP4 dequantization.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from harness.checkpoints import tree_digest
from pipeline.checkpoint import Checkpoint, validate_checkpoint
from pipeline.cli import main as dsv4
from pipeline.dequant import dequantize_checkpoint
from pipeline.formats import fp8_block_dequantize, mxfp4_dequantize
from pipeline.release_layout import FP8, MXFP4, PLAIN

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


def load_all(path: Path) -> dict[str, torch.Tensor]:
    ck = Checkpoint.open(path)
    return dict(ck.iter_tensors())


def expected_bf16(src: Path) -> dict[str, torch.Tensor]:
    raw = load_all(src)
    out = {}
    for key, t in raw.items():
        if key.endswith(".scale") and key[: -len(".scale")] + ".weight" in raw:
            continue
        scale = raw.get(key[: -len(".weight")] + ".scale") if key.endswith(".weight") else None
        if scale is not None and t.dtype == torch.float8_e4m3fn:
            out[key] = fp8_block_dequantize(t, scale, dtype=torch.bfloat16)
        elif scale is not None and t.dtype == torch.int8:
            out[key] = mxfp4_dequantize(t, scale, torch.bfloat16)
        else:
            out[key] = t
    return out


def test_every_tensor_is_dequantized_or_copied_exactly(tiny_release, tmp_path):
    before = tree_digest(tiny_release)
    result = dequantize_checkpoint(tiny_release, tmp_path / "out", progress=False)
    assert tree_digest(tiny_release) == before  # the input is only read
    got, want = load_all(tmp_path / "out"), expected_bf16(tiny_release)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        assert torch.equal(got[key].view(torch.uint8), want[key].view(torch.uint8)), key
    assert result.counts[FP8] > 0 and result.counts[MXFP4] > 0 and result.counts[PLAIN] > 0
    report = validate_checkpoint(tmp_path / "out", full_scales=True)
    assert report.ok and report.layout == "bf16", report.problems


def test_config_loses_its_quantization_config(tiny_release, tmp_path):
    dequantize_checkpoint(tiny_release, tmp_path / "out", progress=False)
    src = json.loads((tiny_release / "config.json").read_text())
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" in src and "quantization_config" not in out
    assert out["dtype"] == "bfloat16"
    assert {k: v for k, v in out.items() if k != "dtype"} == {
        k: v for k, v in src.items() if k not in ("quantization_config", "torch_dtype")
    }


def test_config_names_its_dtype_dtype_not_the_deprecated_torch_dtype(tiny_release, tmp_path):
    """transformers 5 reads and writes `dtype`; `torch_dtype` makes it warn that the key is deprecated."""
    assert "torch_dtype" in json.loads((tiny_release / "config.json").read_text())  # as the release has it
    dequantize_checkpoint(tiny_release, tmp_path / "out", progress=False)
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out["dtype"] == "bfloat16" and "torch_dtype" not in out


def test_non_tensor_files_are_carried_over(tiny_release, tmp_path):
    (tiny_release / "tokenizer.json").write_text('{"version": "1.0"}')
    dequantize_checkpoint(tiny_release, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"version": "1.0"}'


def test_output_is_deterministic_across_shard_sizes_and_workers(tiny_release, tmp_path):
    dequantize_checkpoint(tiny_release, tmp_path / "a", progress=False, workers=1)
    dequantize_checkpoint(tiny_release, tmp_path / "b", progress=False, workers=3)
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    dequantize_checkpoint(tiny_release, tmp_path / "c", progress=False, max_shard_bytes=1 << 20)
    assert len(list((tmp_path / "c").glob("*.safetensors"))) > 2
    assert load_all(tmp_path / "c").keys() == load_all(tmp_path / "a").keys()


def test_bf16_input_is_refused_before_any_work(tiny_bf16, tmp_path, capsys):
    """BF16 handed where the release layout is expected (the reverse of the seeds' Run 1)."""
    assert dsv4(["dequant", str(tiny_bf16), str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "dsv4 dequant needs a release FP8+MXFP4" in err and "BF16" in err
    assert not (tmp_path / "out").exists()


def test_truncated_shard_is_refused_naming_file(tiny_release, tmp_path):
    shard = sorted(tiny_release.glob("*.safetensors"))[0]
    with shard.open("r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    code = dsv4(["dequant", str(tiny_release), str(tmp_path / "out"), "--quiet"])
    assert code == 2
    assert not (tmp_path / "out").exists()


def test_cli_error_names_file_and_key(tiny_release, tmp_path, capsys):
    ck = Checkpoint.open(tiny_release)
    scale_key = next(k for k in ck.tensors if k.endswith("w1.scale"))
    shard = ck.tensors[scale_key].file
    # corrupt one scale byte to 0xFF (UE8M0 NaN), sampled validation reads every scale of a tiny model
    with shard.open("r+b") as f:
        f.seek(ck.tensors[scale_key].begin)
        f.write(b"\xff")
    code = dsv4(["dequant", str(tiny_release), str(tmp_path / "out"), "--quiet", "--full-scales"])
    err = capsys.readouterr().err
    assert code == 2 and shard.name in err and scale_key in err
    assert not (tmp_path / "out").exists()


def test_output_inside_input_is_refused(tiny_release, capsys):
    before = tree_digest(tiny_release)
    code = dsv4(["dequant", str(tiny_release), str(tiny_release / "bf16"), "--quiet"])
    assert code == 2 and "refusing to write the output inside the input" in capsys.readouterr().err
    assert not (tiny_release / "bf16").exists()
    assert tree_digest(tiny_release) == before


def test_dry_run_writes_nothing(tiny_release, tmp_path, capsys):
    assert dsv4(["dequant", str(tiny_release), str(tmp_path / "out"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "MXFP4 -> BF16" in out and "FP8 block -> BF16" in out
    assert not (tmp_path / "out").exists()


def test_safetensors_reads_the_output(tiny_release, tmp_path):
    dequantize_checkpoint(tiny_release, tmp_path / "out", progress=False)
    want = expected_bf16(tiny_release)
    for shard in (tmp_path / "out").glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
                assert torch.equal(f.get_tensor(key).view(torch.uint8), want[key].view(torch.uint8))
