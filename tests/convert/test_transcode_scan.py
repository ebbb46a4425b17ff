"""dsv4 transcode-scan: expert groups (w1+w3 together, w2 alone) judged from their scales only."""

import json

import pytest
import torch

from pipeline.checkpoint import Checkpoint
from pipeline.cli import main as dsv4
from pipeline.release_layout import MXFP4, release_weights
from pipeline.transcode_scan import expert_groups, scan

pytestmark = pytest.mark.unit


def _expected_groups(config) -> int:
    experts = sum(w.fmt == MXFP4 for w in release_weights(config))  # w1, w2, w3 per expert
    return experts // 3 * 2


def test_every_tiny_expert_group_is_exact(tiny_release):
    ck = Checkpoint.open(tiny_release)
    report = scan(ck)
    assert report.groups == _expected_groups(ck.config) and report.exact == report.groups
    assert all(len(keys) == (1 if g.endswith(".w2") else 2) for g, keys in expert_groups(ck).items())


def test_a_w3_scale_spanning_20_octaves_marks_its_group_inexact(tiny_release, capsys):
    ck = Checkpoint.open(tiny_release)
    key = "layers.1.ffn.experts.2.w3.scale"
    info = ck.tensors[key]
    scale = ck.read(key).view(torch.uint8)
    low = int(scale.max()) - 20
    with info.file.open("r+b") as f:  # one block 20 octaves below the group's top
        f.seek(info.begin)
        f.write(bytes([low]))
    report = scan(Checkpoint.open(tiny_release))
    assert report.exact == report.groups - 1
    assert (
        report.worst[0] == (20, "layers.1.ffn.experts.2.w13")
        or report.worst[0][1] == "layers.1.ffn.experts.2.w13"
    )
    assert dsv4(["transcode-scan", str(tiny_release)]) == 0
    out = capsys.readouterr().out
    assert "layers.1.ffn.experts.2.w13" in out and f"{report.groups - 1} of {report.groups}" in out


def test_sample_and_json(tiny_release, capsys):
    assert dsv4(["transcode-scan", str(tiny_release), "--sample", "5", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["groups"] == 5 and data["window_octaves"] == 17


def test_bf16_checkpoint_is_refused(tiny_bf16, capsys):
    assert dsv4(["transcode-scan", str(tiny_bf16)]) == 2
    assert "needs a release FP8+MXFP4" in capsys.readouterr().err
