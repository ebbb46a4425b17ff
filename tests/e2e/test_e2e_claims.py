"""What the commands say about `dsv4 e2e` is true. It once said its checkpoints were "ready for dsv4
serve", which refuses the micro model (no tokenizer; 4 heads, tensor parallel 8); `dsv4 demo --help` once
said the tiny end to end had not landed."""

import json

import pytest

from pipeline.cli import main as dsv4
from pipeline.cli.e2e import serve_note

pytestmark = pytest.mark.unit


@pytest.fixture
def micro(converted):
    """The micro model converted as `dsv4 e2e` converts it (--graft-from the release). Do not mutate."""
    ckpt = converted("experts", graft=True).out_dir
    return ckpt, json.loads((ckpt / "config.json").read_text())


def test_the_note_never_calls_the_micro_checkpoint_ready_to_serve(micro):
    note = serve_note(*micro)
    assert "ready" not in note
    assert note.startswith("not for serving: dsv4 serve refuses them")


def test_every_refusal_the_note_names_is_one_dsv4_serve_prints(micro, capsys, monkeypatch):
    monkeypatch.setenv("PATH", "")  # no nvidia-smi: serve's default tensor parallel size, the node's 8
    ckpt, config = micro
    note = serve_note(ckpt, config)
    assert dsv4(["serve", str(ckpt), "--print"]) == 2
    refused = capsys.readouterr().err
    assert "no tokenizer" in note and "no tokenizer" in refused
    assert "4 attention heads" in note and "does not divide num_attention_heads 4" in refused
    assert "--tensor-parallel-size 1, 2, 4" in note


def test_past_serves_checks_the_note_names_the_head_dim_vllms_kernels_need(micro, tmp_path, capsys):
    ckpt, config = micro
    (tmp_path / "tokenizer.json").write_text("{}")
    argv = ["serve", str(ckpt), "--print", "--tokenizer", str(tmp_path), "--tensor-parallel-size", "4"]
    assert dsv4(argv) == 0  # with both flags serve's own checks pass; vLLM's kernels need more
    assert capsys.readouterr().out.startswith("vllm serve ")
    assert f"head_dim 512; this model's is {config['head_dim']}" in serve_note(ckpt, config)


def test_demo_help_sends_the_reader_to_e2e_and_never_says_it_has_not_landed(capsys):
    with pytest.raises(SystemExit):
        dsv4(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "landed" not in text
    assert "`dsv4 e2e` runs the pipeline itself on a tiny model" in text
