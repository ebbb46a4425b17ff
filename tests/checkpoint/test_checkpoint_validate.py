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
from pipeline.checkpoint import (
    CONFIG_NAME,
    INDEX_NAME,
    Layout,
    read_header,
    read_index,
    require_layout,
    validate_checkpoint,
)
from pipeline.checkpoint.validate import ensure_valid
from pipeline.errors import DsV4Error
from pipeline.formats import mxfp4_dequantize, nvfp4_quantize
from pipeline.release_layout import release_tensors

pytestmark = pytest.mark.unit

# Keys the mutations start from (the release layout lists them for any config with >= 2 layers and >= 4
# routed experts; `shard_of` fails loudly if one is absent). Shards, shapes, counts and messages are
# derived from the checkpoint's own index and config.json, never hard-coded.
LAYER0_KEY = "layers.0.attn.wq_b.weight"
LAYER1_KEY = "layers.1.attn.attn_sink"


def shard_of(ckpt: Path, key: str) -> Path:
    """The shard file the index places ``key`` in."""
    return ckpt / read_index(ckpt / INDEX_NAME)[key]


def keys_in(ckpt: Path, shard: Path) -> list[str]:
    """The keys the index places in ``shard``, sorted."""
    return sorted(k for k, v in read_index(ckpt / INDEX_NAME).items() if v == shard.name)


def config_of(ckpt: Path) -> dict:
    return json.loads((ckpt / CONFIG_NAME).read_text())


def layout_shape(ckpt: Path, key: str) -> list[int]:
    """The shape the release layout (derived from config.json) gives ``key``."""
    [spec] = [t for t in release_tensors(config_of(ckpt)) if t.key == key]
    return list(spec.shape)


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
    shards = set(read_index(tiny_release / INDEX_NAME).values())
    assert report.shards == len(shards) == len(list(tiny_release.glob("*.safetensors")))
    scales = [t.key for t in release_tensors(config_of(tiny_release)) if t.key.endswith(".scale")]
    assert report.scales_checked == report.scales_total == len(scales) > 0
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
    shard = shard_of(tiny_release, LAYER1_KEY)
    last = max(read_header(shard).tensors.values(), key=lambda i: i.end).key
    data = shard.read_bytes()
    shard.write_bytes(data[:-1000])
    # the problem is keyed by the shard's first key; the message names the key whose data runs past
    # the new end of the file
    only_problem(
        validated(tiny_release),
        shard,
        keys_in(tiny_release, shard)[0],
        "truncated",
        f"key {last} ends past the end",
    )


def test_corrupt_header_json(tiny_release):
    shard = shard_of(tiny_release, LAYER1_KEY)
    keys = keys_in(tiny_release, shard)
    data = bytearray(shard.read_bytes())
    data[8] = ord("X")  # the header's opening brace
    shard.write_bytes(bytes(data))
    only_problem(
        validated(tiny_release),
        shard,
        keys[0],
        "corrupt header JSON",
        f"the index places {len(keys)} key(s) here",
    )


def test_index_names_a_missing_shard(tiny_release):
    shard = shard_of(tiny_release, LAYER1_KEY)
    keys = keys_in(tiny_release, shard)
    shard.unlink()
    only_problem(
        validated(tiny_release),
        shard,
        keys[0],
        "shard file is missing",
        f"the index places {len(keys)} key(s) here",
    )


def test_key_in_index_but_absent_from_its_shard(tiny_release):
    shard = shard_of(tiny_release, LAYER0_KEY)
    bogus = LAYER0_KEY.rsplit(".", 2)[0] + ".bogus"  # layers.0.attn.bogus: a plausible key, not in any shard
    edit_json(tiny_release / INDEX_NAME, lambda d: d["weight_map"].update({bogus: shard.name}))
    only_problem(validated(tiny_release), shard, bogus, "the shard lacks it")


def test_key_in_two_shards(tiny_release):
    home = shard_of(tiny_release, "embed.weight")
    extra = shard_of(tiny_release, LAYER1_KEY)
    assert home != extra and home.name < extra.name  # the later shard's copy is the duplicate
    rewrite_shard(extra, lambda t: t.update({"embed.weight": torch.zeros(2, dtype=torch.bfloat16)}))
    report = validated(tiny_release)
    only_problem(report, extra, "embed.weight", f"also in {home.name}")


def test_missing_scale_sibling(tiny_release):
    weight = LAYER0_KEY
    scale = weight.removesuffix(".weight") + ".scale"
    shard = shard_of(tiny_release, scale)
    rows, cols = config_of(tiny_release)["quantization_config"]["weight_block_size"]
    rewrite_shard(shard, lambda t: t.pop(scale))
    edit_json(tiny_release / INDEX_NAME, lambda d: d["weight_map"].pop(scale))
    only_problem(
        validated(tiny_release),
        shard_of(tiny_release, weight),
        weight,
        f"has no {scale}",
        f"{rows}x{cols} tile",
    )


def test_mxfp4_scale_of_the_wrong_shape(tiny_release):
    key = "layers.1.ffn.experts.2.w2.scale"
    shard = shard_of(tiny_release, key)
    good = layout_shape(tiny_release, key)
    bad = [*good[:-1], good[-1] - 1]  # one UE8M0 block scale short per row
    rewrite_shard(shard, lambda t: t.update({key: t[key][:, :-1].contiguous()}))
    only_problem(validated(tiny_release), shard, key, f"shape {bad}, expected {good}", "MXFP4")


def test_fp8_scale_of_the_wrong_shape(tiny_release):
    key = "layers.0.attn.wq_a.scale"
    shard = shard_of(tiny_release, key)
    good = layout_shape(tiny_release, key)  # ceil(rows / 128) x ceil(cols / 128) tiles
    # Drop the last tile along the first axis that has more than one (the 2-layer model's wq_a had two
    # tile rows; the micro model's has one tile row and two tile columns).
    axis = next(i for i, n in enumerate(good) if n > 1)
    bad = [n - (i == axis) for i, n in enumerate(good)]
    rewrite_shard(shard, lambda t: t.update({key: t[key].narrow(axis, 0, bad[axis]).contiguous()}))
    only_problem(validated(tiny_release), shard, key, f"shape {bad}, expected {good}")


def test_nan_ue8m0_scale(tiny_release):
    key = "layers.1.ffn.experts.3.w1.scale"
    shard = shard_of(tiny_release, key)
    info = read_header(shard).tensors[key]
    assert info.numel > 5
    with shard.open("r+b") as f:
        f.seek(info.begin + 5)
        f.write(b"\xff")
    only_problem(
        validated(tiny_release, full_scales=True),
        shard,
        key,
        "NaN (byte 0xFF) at flat index 5",
    )


# Each case: the field, its bad value from the true config c, and the fragments the problem must have.
# The values are the true ones moved by one, as the 2-layer model's cases were (num_hidden_layers 2 ->
# 3 and 1, n_routed_experts 4 -> 5, num_hash_layers 1 -> 2 and 0, compress_ratios one entry short).
_CONFIG_CASES = {
    "one-layer-too-many": (
        "num_hidden_layers",
        lambda c: c["num_hidden_layers"] + 1,
        lambda c: [
            f"is {c['num_hidden_layers'] + 1} but the tensors have {c['num_hidden_layers']} layer(s)",
            f"missing layers.{c['num_hidden_layers']}",
        ],
    ),
    "one-layer-too-few": (
        "num_hidden_layers",
        lambda c: c["num_hidden_layers"] - 1,
        lambda c: [
            f"is {c['num_hidden_layers'] - 1} but the tensors have {c['num_hidden_layers']} layer(s)",
            f"unexpected layers.{c['num_hidden_layers'] - 1}",
        ],
    ),
    "one-expert-too-many": (
        "n_routed_experts",
        lambda c: c["n_routed_experts"] + 1,
        lambda c: [
            f"is {c['n_routed_experts'] + 1} but layers.0 has {c['n_routed_experts']} expert(s), "
            f"missing {c['n_routed_experts']}"
        ],
    ),
    "one-hash-layer-too-many": (
        "num_hash_layers",
        lambda c: c["num_hash_layers"] + 1,
        lambda c: [
            f"layer {c['num_hash_layers']} is a hash layer and needs "
            f"layers.{c['num_hash_layers']}.ffn.gate.tid2eid"
        ],
    ),
    "one-hash-layer-too-few": (
        "num_hash_layers",
        lambda c: c["num_hash_layers"] - 1,
        lambda c: [f"layer {c['num_hash_layers'] - 1} is not a hash layer"],
    ),
    "compress-ratios-one-short": (
        "compress_ratios",
        lambda c: c["compress_ratios"][:-1],
        lambda c: [
            f"has {len(c['compress_ratios']) - 1} entries; "
            "expected num_hidden_layers + num_nextn_predict_layers = "
            f"{c['num_hidden_layers'] + c['num_nextn_predict_layers']}"
        ],
    ),
}


@pytest.mark.parametrize(("field", "value", "fragments"), _CONFIG_CASES.values(), ids=_CONFIG_CASES)
def test_config_mismatch(tiny_release, field, value, fragments):
    cfg = tiny_release / CONFIG_NAME
    true = config_of(tiny_release)
    assert true["num_hash_layers"] < true["num_hidden_layers"]  # so both hash cases have a layer to name
    edit_json(cfg, lambda d: d.update({field: value(true)}))
    only_problem(validated(tiny_release), cfg, field, *fragments(true))


def test_compress_ratio_mismatch_names_the_layer(tiny_release):
    """Two entries contradict their layers' tensors: a CSA layer (ratio 4: compressor + indexer) claimed
    as HCA, and an HCA layer (compressor only) claimed as sliding-only; each is named by its index."""
    cfg = tiny_release / CONFIG_NAME
    ratios = config_of(tiny_release)["compress_ratios"]
    layers = config_of(tiny_release)["num_hidden_layers"]
    csa = next(i for i, r in enumerate(ratios[:layers]) if r == 4)
    hca = next(i for i, r in enumerate(ratios[:layers]) if r > 1 and r != 4)
    bad = list(ratios)
    bad[csa], bad[hca] = 128, 1
    edit_json(cfg, lambda d: d.update({"compress_ratios": bad}))
    report = validated(tiny_release)
    only_problem(
        report, cfg, f"compress_ratios[{csa}]", f"is 128, so layers.{csa}.attn.indexer.* should be absent"
    )
    only_problem(
        report, cfg, f"compress_ratios[{hca}]", f"is 1, so layers.{hca}.attn.compressor.* should be absent"
    )
    assert {p.key for p in report.problems} == {f"compress_ratios[{csa}]", f"compress_ratios[{hca}]"}


def test_all_problems_are_collected_and_raised_as_one_line(tiny_release):
    """The report keeps every problem; the error is one line: the first, how many more, and where the
    whole list is (`dsv4 validate`)."""
    shard_of(tiny_release, LAYER1_KEY).unlink()
    experts = config_of(tiny_release)["n_routed_experts"]
    edit_json(tiny_release / CONFIG_NAME, lambda d: d.update({"n_routed_experts": 2 * experts}))
    report = validated(tiny_release)
    assert len(report.problems) >= 2
    with pytest.raises(DsV4Error) as raised:
        report.raise_if_invalid()
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"{tiny_release}: invalid checkpoint: {report.problems[0]} ")
    assert (
        f"(and {len(report.problems) - 1} more problem(s); `dsv4 validate {tiny_release}` lists them)"
        in message
    )


def to_nvfp4_experts(ckpt: Path) -> Path:
    """Turn layer 1's routed experts into the NVFP4 export layout (U8 weight, e4m3 weight_scale, F32
    weight_scale_2 and input_scale), as NVIDIA's DeepSeek-V4-Pro-NVFP4 ships them."""
    shard = shard_of(ckpt, LAYER1_KEY)
    assert {k.split(".", 2)[1] for k in keys_in(ckpt, shard)} == {"1"}  # layer 1 has a shard of its own

    def edit(t):
        for key in [k for k in t if ".ffn.experts." in k and k.endswith(".weight")]:
            stem = key.removesuffix(".weight")
            w = mxfp4_dequantize(t.pop(key), t.pop(f"{stem}.scale"), torch.float32)
            t[key], t[f"{key}_scale"], t[f"{key}_scale_2"] = nvfp4_quantize(w)
            t[f"{stem}.input_scale"] = torch.tensor(0.01)

    rewrite_shard(shard, edit)
    keys = read_header(shard).tensors

    def reindex(d):
        d["weight_map"] = {k: v for k, v in d["weight_map"].items() if v != shard.name} | dict.fromkeys(
            keys, shard.name
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
    shard = shard_of(ckpt, f"{stem}.weight")
    rewrite_shard(shard, lambda t: edit(t, stem))
    edit_json(
        ckpt / INDEX_NAME,
        lambda d: d.update(
            weight_map={**d["weight_map"], **dict.fromkeys(read_header(shard).tensors, shard.name)}
        ),
    )
    if "weight_scale_2" in fragment:
        edit_json(ckpt / INDEX_NAME, lambda d: d["weight_map"].pop(f"{stem}.weight_scale_2"))
    only_problem(validated(ckpt, full_scales=True), shard, key.format(s=stem), fragment.format(s=stem))
