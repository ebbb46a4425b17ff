"""pipeline/convert/stream.py on synthetic ModelOpt exports of the micro model, torch only: the stream gives
what `dsv4 convert` writes, and says which key is wrong when the input is incomplete. (The vllm tier,
tests/plugin/test_vllm_plugin.py, feeds it through vLLM's own iterator and loader.)"""

from __future__ import annotations

import json
import re

import pytest
import torch

from pipeline.checkpoint import Checkpoint
from pipeline.convert.stream import StreamConverter, StreamConvertError
from pipeline.mapping import UnmappedKeyError

pytestmark = pytest.mark.unit


def _bytes(t: torch.Tensor) -> bytes:
    flat = t.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def _stream(ex):
    return StreamConverter(json.loads((ex / "config.json").read_text())), list(
        Checkpoint.open(ex).iter_tensors()
    )


@pytest.mark.parametrize(
    ("recipe", "dialect", "w13"), [("full", "X", "shared"), ("experts", "H", "separate")]
)
def test_the_stream_gives_what_convert_writes(exports, converted, recipe, dialect, w13):
    stream, pairs = _stream(exports(recipe, dialect, w13))
    got = dict(stream.convert(pairs))
    want = dict(Checkpoint.open(converted(recipe, dialect, w13).out_dir).iter_tensors())
    assert got.keys() == want.keys()
    assert all(got[k].dtype == want[k].dtype and _bytes(got[k]) == _bytes(want[k]) for k in want)
    assert stream.summary is not None and stream.summary.dialect == dialect
    assert stream.summary.stats.unify.changed == converted(recipe, dialect, w13).stats.unify.changed


def test_a_missing_tensor_is_named(exports):
    stream, pairs = _stream(exports("full", "X"))
    pairs = [(k, t) for k, t in pairs if k != "model.layers.1.attn.wo_b.weight"]
    with pytest.raises(StreamConvertError, match=r"never got model\.layers\.1\.attn\.wo_b\.weight\b"):
        list(stream.convert(pairs))


def test_a_missing_plain_tensor_is_named_at_the_end(exports):
    stream, pairs = _stream(exports("experts", "X"))
    pairs = [(k, t) for k, t in pairs if k != "model.layers.1.attn.wo_b.weight"]
    with pytest.raises(
        StreamConvertError, match=r"without a source for 2 tensor\(s\).*layers\.1\.attn\.wo_b"
    ):
        list(stream.convert(pairs))


def test_whole_experts_may_be_absent_but_not_part_of_one(exports):
    """vLLM's expert-parallel filter skips every tensor of a non-local expert (by `.experts.E.` in the
    name) before reading it: the stream accepts that; a partial expert is an error."""
    ex = exports("experts", "X")
    stream, pairs = _stream(ex)
    whole = [(k, t) for k, t in pairs if ".experts.1." not in k]
    list(stream.convert(whole))
    assert stream.summary is not None and stream.summary.skipped_experts > 0
    stream, pairs = _stream(ex)
    partial = [(k, t) for k, t in pairs if not re.search(r"\.experts\.1\.w2\.", k)]
    with pytest.raises(StreamConvertError, match=r"experts\.1\.w2\.weight"):
        list(stream.convert(partial))


def test_keys_of_two_dialects_or_no_dialect_are_refused(exports):
    stream, pairs = _stream(exports("experts", "X"))
    with pytest.raises(UnmappedKeyError, match=r"^model\.layers\.0\.self_attn\.q_a_proj\.weight: "):
        list(stream.convert([*pairs[:3], ("model.layers.0.self_attn.q_a_proj.weight", torch.zeros(1))]))
    stream, _ = _stream(exports("experts", "X"))
    with pytest.raises(UnmappedKeyError, match=r"^model\.layers\.0\.attn\.wq_z\.weight: no rule"):
        list(stream.convert([("model.layers.0.attn.wq_z.weight", torch.zeros(1))]))


def test_a_tensor_twice_is_refused(exports):
    stream, pairs = _stream(exports("experts", "X"))
    key, tensor = next((k, t) for k, t in pairs if k.endswith("attn.wo_b.weight"))
    with pytest.raises(StreamConvertError, match="written twice"):
        list(stream.convert([(key, tensor), (key, tensor)]))
