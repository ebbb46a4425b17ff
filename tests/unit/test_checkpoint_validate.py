"""pipeline.checkpoint validation: a good release-layout checkpoint passes; each bad input is reported
with its file and key; the wrong layout is refused with a clear message; inputs are never modified."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from harness.checkpoints import tree_digest
from pipeline.checkpoint import INDEX_NAME, Layout, read_header, require_layout, validate_checkpoint
from pipeline.checkpoint.validate import ensure_valid
from pipeline.errors import DsV4Error
from pipeline.formats import mxfp4_dequantize, nvfp4_quantize

pytestmark = pytest.mark.unit

SHARD1 = "model-00001-of-00003.safetensors"  # embed + layers.0
SHARD2 = "model-00002-of-00003.safetensors"  # layers.1


def validated(path: Path, **kw):
    """Validate, checking that the checkpoint's files are byte-for-byte unchanged afterwards."""
    before = tree_digest(path)
    report = validate_checkpoint(path, **kw)
    assert tree_digest(path) == before
    return report


def only_problem(report, file: Path | str, key: str, *fragments: str):
    """A problem for ``file`` and ``key`` whose text names both and has every fragment."""
    assert not report.ok
    hits = [p for p in report.problems if p.file == str(file) and p.key == key]
    assert hits, f"no problem for {file} / {key}; got: {[str(p) for p in report.problems]}"
    text = str(hits[0])
    assert str(file) in text and key in text
    for frag in fragments:
        assert frag in text, text
    return hits[0]


def rewrite_shard(path: Path, edit) -> None:
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_tiny_release_is_valid(tiny_release):
    report = validated(tiny_release, full_scales=True)
    assert report.ok, [str(p) for p in report.problems]
    assert report.layout == Layout.RELEASE.value
    assert report.shards == 3 and report.scales_checked == report.scales_total > 0
    ensure_valid(tiny_release, expect=Layout.RELEASE)


def test_tiny_bf16_is_valid(tiny_bf16):
    report = validated(tiny_bf16)
    assert report.ok, [str(p) for p in report.problems]
    assert report.layout == Layout.BF16.value and report.scales_total == 0


def test_fp8_checkpoint_where_bf16_is_needed(tiny_release):
    """The user's Run 1: the release (FP8) handed to a step that needs BF16."""
    report = validated(tiny_release, expect=Layout.BF16, step="quantize")
    [p] = report.problems
    assert p.file == str(tiny_release)
    assert "quantize needs a BF16" in p.message and "this is release FP8+MXFP4" in p.message
    assert re.search(r"layers\.0\.[\w.]+\.weight is F8_E4M3 with a block scale", p.message)
    assert "dequantize" in p.message
    with pytest.raises(
        DsV4Error, match=r"quantize needs a BF16 .* dequantize the release checkpoint to BF16 first"
    ):
        require_layout(tiny_release, Layout.BF16, step="quantize")


def test_bf16_checkpoint_where_the_release_is_needed(tiny_bf16):
    report = validated(tiny_bf16, expect=Layout.RELEASE, step="dequantize")
    [p] = report.problems
    assert "dequantize needs a release FP8+MXFP4" in p.message and "this is BF16" in p.message
    assert ".weight is BF16" in p.message
    with pytest.raises(DsV4Error, match=str(tiny_bf16)):
        ensure_valid(tiny_bf16, expect=Layout.RELEASE, step="dequantize")


def test_truncated_shard(tiny_release):
    shard = tiny_release / SHARD2
    data = shard.read_bytes()
    shard.write_bytes(data[:-1000])
    # the message names the key whose data runs past the new end of the file
    only_problem(validated(tiny_release), shard, "layers.1.attn.attn_sink", "truncated", "ends past the end")


def test_corrupt_header_json(tiny_release):
    shard = tiny_release / SHARD2
    data = bytearray(shard.read_bytes())
    data[8] = ord("X")  # the header's opening brace
    shard.write_bytes(bytes(data))
    only_problem(
        validated(tiny_release), shard, "layers.1.attn.attn_sink", "corrupt header JSON", "key(s) here"
    )


def test_index_names_a_missing_shard(tiny_release):
    (tiny_release / SHARD2).unlink()
    only_problem(
        validated(tiny_release), tiny_release / SHARD2, "layers.1.attn.attn_sink", "shard file is missing"
    )


def test_key_in_index_but_absent_from_its_shard(tiny_release):
    edit_json(tiny_release / INDEX_NAME, lambda d: d["weight_map"].update({"layers.0.attn.bogus": SHARD1}))
    only_problem(validated(tiny_release), tiny_release / SHARD1, "layers.0.attn.bogus", "the shard lacks it")


def test_key_in_two_shards(tiny_release):
    extra = tiny_release / SHARD2
    rewrite_shard(extra, lambda t: t.update({"embed.weight": torch.zeros(2, dtype=torch.bfloat16)}))
    report = validated(tiny_release)
    only_problem(report, extra, "embed.weight", f"also in {SHARD1}")


def test_missing_scale_sibling(tiny_release):
    rewrite_shard(tiny_release / SHARD1, lambda t: t.pop("layers.0.attn.wq_b.scale"))
    edit_json(tiny_release / INDEX_NAME, lambda d: d["weight_map"].pop("layers.0.attn.wq_b.scale"))
    only_problem(
        validated(tiny_release),
        tiny_release / SHARD1,
        "layers.0.attn.wq_b.weight",
        "has no layers.0.attn.wq_b.scale",
        "128x128 tile",
    )


def test_mxfp4_scale_of_the_wrong_shape(tiny_release):
    key = "layers.1.ffn.experts.2.w2.scale"
    rewrite_shard(tiny_release / SHARD2, lambda t: t.update({key: t[key][:, :3].contiguous()}))
    only_problem(
        validated(tiny_release), tiny_release / SHARD2, key, "shape [256, 3], expected [256, 4]", "MXFP4"
    )


def test_fp8_scale_of_the_wrong_shape(tiny_release):
    key = "layers.0.attn.wq_a.scale"  # [192, 256] weight -> [2, 2] tiles
    rewrite_shard(tiny_release / SHARD1, lambda t: t.update({key: t[key][:1].contiguous()}))
    only_problem(validated(tiny_release), tiny_release / SHARD1, key, "shape [1, 2], expected [2, 2]")


def test_nan_ue8m0_scale(tiny_release):
    key = "layers.1.ffn.experts.3.w1.scale"
    info = read_header(tiny_release / SHARD2).tensors[key]
    with (tiny_release / SHARD2).open("r+b") as f:
        f.seek(info.begin + 5)
        f.write(b"\xff")
    only_problem(
        validated(tiny_release, full_scales=True),
        tiny_release / SHARD2,
        key,
        "NaN (byte 0xFF) at flat index 5",
    )


@pytest.mark.parametrize(
    ("field", "value", "fragments"),
    [
        ("num_hidden_layers", 3, ["is 3 but the tensors have 2 layer(s)", "missing layers.2"]),
        ("num_hidden_layers", 1, ["unexpected layers.1"]),
        ("n_routed_experts", 5, ["is 5 but layers.0 has 4 expert(s), missing 4"]),
        ("num_hash_layers", 2, ["layer 1 is a hash layer and needs layers.1.ffn.gate.tid2eid"]),
        ("num_hash_layers", 0, ["layer 0 is not a hash layer"]),
        ("compress_ratios", [4, 128], ["has 2 entries; expected num_hidden_layers + 1 = 3"]),
    ],
)
def test_config_mismatch(tiny_release, field, value, fragments):
    cfg = tiny_release / "config.json"
    edit_json(cfg, lambda d: d.update({field: value}))
    only_problem(validated(tiny_release), cfg, field, *fragments)


def test_compress_ratio_mismatch_names_the_layer(tiny_release):
    cfg = tiny_release / "config.json"
    edit_json(cfg, lambda d: d.update({"compress_ratios": [128, 1, 0]}))
    report = validated(tiny_release)
    only_problem(report, cfg, "compress_ratios[0]", "layers.0.attn.indexer.* should be absent")
    only_problem(report, cfg, "compress_ratios[1]", "layers.1.attn.compressor.* should be absent")


def test_all_problems_are_collected_and_raised_together(tiny_release):
    (tiny_release / SHARD2).unlink()
    edit_json(tiny_release / "config.json", lambda d: d.update({"n_routed_experts": 8}))
    report = validated(tiny_release)
    assert len(report.problems) >= 2
    with pytest.raises(DsV4Error, match=r"invalid checkpoint, \d+ problem\(s\):\n  .*shard file is missing"):
        report.raise_if_invalid()


def to_nvfp4_experts(ckpt: Path) -> Path:
    """Turn layer 1's routed experts into the NVFP4 export layout (U8 weight, e4m3 weight_scale, F32
    weight_scale_2 and input_scale), as NVIDIA's DeepSeek-V4-Pro-NVFP4 ships them."""
    shard = ckpt / SHARD2

    def edit(t):
        for key in [k for k in t if ".ffn.experts." in k and k.endswith(".weight")]:
            stem = key.removesuffix(".weight")
            w = mxfp4_dequantize(t.pop(key), t.pop(f"{stem}.scale"), torch.float32)
            t[key], t[f"{key}_scale"], t[f"{key}_scale_2"] = nvfp4_quantize(w)
            t[f"{stem}.input_scale"] = torch.tensor(0.01)

    rewrite_shard(shard, edit)
    keys = read_header(shard).tensors

    def reindex(d):
        d["weight_map"] = {k: v for k, v in d["weight_map"].items() if v != SHARD2} | dict.fromkeys(
            keys, SHARD2
        )

    edit_json(ckpt / INDEX_NAME, reindex)
    return ckpt


def test_nvfp4_export_is_valid_and_classified(tiny_release):
    ckpt = to_nvfp4_experts(tiny_release)
    report = validated(ckpt, full_scales=True)
    assert report.ok, [str(p) for p in report.problems]
    assert report.layout == Layout.NVFP4.value
    assert "U8 with" in report.layout_evidence
    report = validated(ckpt, expect=Layout.RELEASE, step="dequantize")
    assert "not an NVFP4 export" in report.problems[0].message


@pytest.mark.parametrize(
    ("edit", "key", "fragment"),
    [
        (lambda t, s: t.pop(f"{s}.weight_scale_2"), "{s}.weight", "has no {s}.weight_scale_2"),
        (
            lambda t, s: t.update({f"{s}.weight_scale": t[f"{s}.weight_scale"].float()}),
            "{s}.weight_scale",
            "dtype F32, expected F8_E4M3",
        ),
        (
            lambda t, s: t.update({f"{s}.input_scale": torch.ones(2)}),
            "{s}.input_scale",
            "shape [2], expected [] or [1]",
        ),
        (
            lambda t, s: t.update({f"{s}.weight_scale_2": torch.tensor(-1.0)}),
            "{s}.weight_scale_2",
            "scale is not positive",
        ),
        (
            lambda t, s: t[f"{s}.weight_scale"].view(torch.uint8)[0, 3].fill_(0),
            "{s}.weight_scale",
            "scale is zero at flat index 3",
        ),
    ],
    ids=["missing-scale-2", "scale-dtype", "input-scale-shape", "negative-scale-2", "zero-block-scale"],
)
def test_nvfp4_bad_scales(tiny_release, edit, key, fragment):
    ckpt = to_nvfp4_experts(tiny_release)
    stem = "layers.1.ffn.experts.1.w3"
    rewrite_shard(ckpt / SHARD2, lambda t: edit(t, stem))
    edit_json(
        ckpt / INDEX_NAME,
        lambda d: d.update(
            weight_map={**d["weight_map"], **dict.fromkeys(read_header(ckpt / SHARD2).tensors, SHARD2)}
        ),
    )
    if "weight_scale_2" in fragment:
        edit_json(ckpt / INDEX_NAME, lambda d: d["weight_map"].pop(f"{stem}.weight_scale_2"))
    only_problem(
        validated(ckpt, full_scales=True), ckpt / SHARD2, key.format(s=stem), fragment.format(s=stem)
    )
