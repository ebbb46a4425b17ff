"""hf_ptq end to end on a GPU: `dsv4 quantize --driver hf_ptq` runs ModelOpt's own examples/hf_ptq main()
(the node's driver) on the micro model with CUDA calibration, under our runtime patches; its export then
goes through `dsv4 convert`. What a CPU cannot run: hf_ptq's main() raises OSError without CUDA.

Needs a Model-Optimizer checkout (DSV4_MODELOPT_REPO; bench/gpu_tier.sh sets it when the checkout was
carried as .carry/Model-Optimizer) and the `tokenizers` package (hf_ptq loads a tokenizer from the model
directory; the micro model gets a word-level one built here). No network: calibration text is a local
.jsonl, which ModelOpt 0.47 reads without the `datasets` package.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.quant]


@pytest.fixture(scope="module")
def repo() -> Path:
    raw = os.environ.get("DSV4_MODELOPT_REPO")
    if not raw:
        pytest.skip(
            "DSV4_MODELOPT_REPO is not set: carry a Model-Optimizer checkout (bench/gpu_tier.sh pack)"
        )
    return Path(raw)


def _with_tokenizer(model_dir: Path, vocab: int) -> None:
    tokenizers = pytest.importorskip("tokenizers", reason="hf_ptq loads a tokenizer; `tokenizers` builds one")
    from tokenizers import models, pre_tokenizers

    words = {f"t{i}": i for i in range(vocab)}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab=words, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "t0",
                "eos_token": "t1",
                "unk_token": "t0",
                "pad_token": "t1",
                "model_max_length": 4096,
            }
        )
    )


@pytest.mark.parametrize("recipe", ["experts"])
def test_hf_ptq_driver_quantizes_on_cuda_and_the_export_converts(repo, tmp_path, recipe, capsys):
    from harness.tiny import build_tiny_release
    from pipeline.checkpoint import Checkpoint, validate_checkpoint
    from pipeline.cli import main as dsv4
    from pipeline.convert import convert_checkpoint
    from pipeline.dequant import dequantize_checkpoint

    release = build_tiny_release(tmp_path / "release", "micro", seed=0)
    bf16 = dequantize_checkpoint(release, tmp_path / "bf16", progress=False).out_dir
    config = json.loads((bf16 / "config.json").read_text())
    model = tmp_path / "model"
    shutil.copytree(bf16, model)
    _with_tokenizer(model, config["vocab_size"])
    rng = random.Random(0)
    calib = tmp_path / "calib.jsonl"
    calib.write_text(
        "".join(
            json.dumps({"text": " ".join(f"t{rng.randrange(2, 512)}" for _ in range(48))}) + "\n"
            for _ in range(32)
        )
    )
    export = tmp_path / "export"
    rc = dsv4(
        [
            "quantize", str(model), str(export), "--driver", "hf_ptq", "--modelopt-repo", str(repo),
            "--recipe", recipe, "--calib-file", str(calib), "--calib-size", "16", "--calib-seq", "32",
            "--calib-batch", "4", "--tp", "1",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    print(out)
    assert rc == 0, out
    assert "patches reached" in out
    tensors = Checkpoint.open(export).tensors
    nvfp4 = [k for k, i in tensors.items() if i.dtype == "U8"]
    assert nvfp4 and all(".experts." in k for k in nvfp4)  # nvfp4_experts_only: routed experts only
    result = convert_checkpoint(export, tmp_path / "converted", graft_from=release, progress=False)
    assert validate_checkpoint(result.out_dir, full_scales=True).ok
