"""Hostile inputs on the reading side: every command refuses them with one line naming the file (and key),
exit 2 (`dsv4 validate`: exit 1, the problem listed), no traceback, no hang, the input unchanged.

* a shard, index or config.json that is a FIFO (reading one waits forever for a writer);
* a weight_map entry outside the checkpoint folder (``..``, an absolute path) or in a subfolder;
* a key written twice in one safetensors header;
* a quantization_config that does not describe the release's FP8/MXFP4 tensors;
* a bad value validation's scale sample did not read: a NaN/zero/negative/Inf scale, a NaN FP8 weight,
  caught where the step reads it, before the shard it would land in is complete.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import stat
import struct
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from harness.replica import clone_replica
from pipeline import cli
from pipeline.checkpoint import CONFIG_NAME, INDEX_NAME, Checkpoint, read_header, read_index
from pipeline.checkpoint import validate as validate_module
from pipeline.checkpoint.reader import TensorInfo
from pipeline.convert import Job, RunStats, run_action
from pipeline.errors import DsV4Error
from pipeline.mapping import BF16_TO_FP8

pytestmark = pytest.mark.unit

FP8_WEIGHT = "layers.0.attn.wq_b.weight"  # an FP8 block weight of the release layout, with a .scale
HANG_LIMIT_S = 20  # far above the milliseconds a refusal takes; only a regression waits this long


# ---- helpers ------------------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, object]:
    """Every entry under ``root``: a regular file's bytes, or what else it is (never opening a FIFO)."""
    out: dict[str, object] = {}
    for p in sorted(root.rglob("*")):
        mode = os.lstat(p).st_mode
        if stat.S_ISLNK(mode):
            out[str(p)] = ("link", os.readlink(p))
        elif stat.S_ISREG(mode):
            out[str(p)] = p.read_bytes()
        else:
            out[str(p)] = stat.S_IFMT(mode)
    return out


def run_cli(capsys, fifos: list[Path], *argv) -> tuple[int, str, str]:
    """`dsv4 ARGV` in-process, in a thread: if it is still reading a FIFO after HANG_LIMIT_S, the test
    opens the FIFO's write side and closes it (the reader sees end of file), then fails."""
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(rc=cli.main([str(a) for a in argv])), daemon=True)
    thread.start()
    thread.join(HANG_LIMIT_S)
    if thread.is_alive():
        for fifo in fifos:
            with contextlib.suppress(OSError):  # no reader on this one
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(HANG_LIMIT_S)
        pytest.fail(f"dsv4 {' '.join(map(str, argv))} blocked on a FIFO for {HANG_LIMIT_S} s")
    out, err = capsys.readouterr()
    return result["rc"], out, err


def assert_one_line_error(rc: int, err: str, *fragments: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dsv4: error: "), err
    for frag in fragments:
        assert frag in lines[0], lines[0]


def shard_of(ckpt: Path, key: str) -> Path:
    return ckpt / read_index(ckpt / INDEX_NAME)[key]


def rewrite_shard(path: Path, edit) -> None:
    header = read_header(path)
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata=header.metadata)


def set_bytes(tensors: dict, key: str, value: int, index: int = 0) -> None:
    """Set byte ``index`` of a 1-byte-per-element tensor (FP8, UE8M0) to ``value``."""
    raw = tensors[key].clone().reshape(-1).view(torch.uint8)
    raw[index] = value
    tensors[key] = raw.view(tensors[key].dtype).reshape(tensors[key].shape)


def mxfp4_scale_key(ckpt: Path) -> str:
    """The first routed expert's MXFP4 block scale in the checkpoint (an I8 weight with a .scale)."""
    ck = Checkpoint.open(ckpt)
    return next(
        k[: -len(".weight")] + ".scale"
        for k, t in sorted(ck.tensors.items())
        if ".experts." in k and k.endswith(".weight") and t.dtype == "I8"
    )


def complete_shards_holding(out: Path, key: str) -> list[Path]:
    """Output shards under their final name whose header holds ``key``."""
    return [p for p in sorted(out.glob("*.safetensors")) if key in read_header(p).tensors]


@pytest.fixture
def unsampled(monkeypatch):
    """Validation reads no scale values (as when its sample misses the bad one)."""
    monkeypatch.setattr(validate_module, "_check_scale_values", lambda report, *a, **kw: None)


# ---- item 4: FIFOs ------------------------------------------------------------------------------

COMMANDS = {
    "validate": lambda src, tmp: ["validate", src],
    "inspect": lambda src, tmp: ["inspect", src],
    "dequant": lambda src, tmp: ["dequant", src, tmp / "out", "--quiet"],
    "slice": lambda src, tmp: ["slice", src, tmp / "out", "--layers", "1", "--experts", "2", "--quiet"],
    "transcode-scan": lambda src, tmp: ["transcode-scan", src],
}


def expect_refusal(command: str, rc: int, out: str, err: str, *fragments: str) -> None:
    if command == "validate":  # lists the problem and exits 1 (invalid)
        assert rc == 1 and "Traceback" not in err, (out, err)
        problems = [line for line in out.splitlines() if line.startswith("problem: ")]
        assert problems and all(f in problems[0] for f in fragments), out
    else:
        assert_one_line_error(rc, err, *fragments)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_shard_that_is_a_fifo_is_refused_without_opening_it(tiny_release, tmp_path, capsys, command):
    shard = shard_of(tiny_release, FP8_WEIGHT)
    shard.unlink()
    os.mkfifo(shard)
    before = snapshot(tiny_release)
    rc, out, err = run_cli(capsys, [shard], *COMMANDS[command](tiny_release, tmp_path))
    expect_refusal(command, rc, out, err, str(shard), "FIFO")
    assert snapshot(tiny_release) == before
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.safetensors"))


@pytest.mark.parametrize("name", [INDEX_NAME, CONFIG_NAME])
@pytest.mark.parametrize("command", ["validate", "inspect", "dequant"])
def test_an_index_or_config_that_is_a_fifo_is_refused(tiny_release, tmp_path, capsys, name, command):
    path = tiny_release / name
    path.unlink()
    os.mkfifo(path)
    before = snapshot(tiny_release)
    rc, out, err = run_cli(capsys, [path], *COMMANDS[command](tiny_release, tmp_path))
    expect_refusal(command, rc, out, err, str(path), "FIFO")
    assert snapshot(tiny_release) == before


def test_fix_config_refuses_a_fifo_config(tiny_release, capsys):
    path = tiny_release / CONFIG_NAME
    path.unlink()
    os.mkfifo(path)
    rc, _, err = run_cli(capsys, [path], "fix-config", tiny_release, "--dry-run")
    assert_one_line_error(rc, err, str(path), "FIFO")


def test_a_fifo_named_like_a_shard_is_refused_without_an_index(tiny_release, tmp_path, capsys):
    """Without an index the shards are the folder's *.safetensors: a FIFO among them is refused too."""
    (tiny_release / INDEX_NAME).unlink()
    for p in tiny_release.glob("*.safetensors"):
        p.unlink()
    save_file({"x": torch.zeros(2)}, tiny_release / "a.safetensors")
    fifo = tiny_release / "b.safetensors"
    os.mkfifo(fifo)
    rc, _, err = run_cli(capsys, [fifo], "inspect", tiny_release)
    assert_one_line_error(rc, err, str(fifo), "FIFO")


def test_a_folder_of_symlinks_into_a_cache_is_read(tiny_release, tmp_path, capsys):
    """A Hugging Face cache snapshot is a folder of links to ../../blobs/<hash>: outside the folder,
    and still the checkpoint vLLM reads. Links are followed when their target is a regular file."""
    blobs = tmp_path / "cache" / "blobs"
    snap = tmp_path / "cache" / "snapshots" / "rev"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, p in enumerate(sorted(tiny_release.iterdir())):
        p.rename(blobs / f"blob{i}")
        (snap / p.name).symlink_to(Path("..", "..", "blobs", f"blob{i}"))
    rc, out, err = run_cli(capsys, [], "validate", snap)
    assert rc == 0, out + err
    target = blobs / os.readlink(shard_of(snap, FP8_WEIGHT)).rsplit("/", 1)[1]
    target.unlink()
    os.mkfifo(target)  # a link to a FIFO is refused like the FIFO
    rc, out, err = run_cli(capsys, [target], "inspect", snap)
    assert_one_line_error(rc, err, str(shard_of(snap, FP8_WEIGHT)), "FIFO")


# ---- item 5: weight_map names outside the folder, or in a subfolder -----------------------------


def move_shard(ckpt: Path, tmp_path: Path, where: str) -> tuple[Path, str, str]:
    """Move the shard holding FP8_WEIGHT somewhere (a valid safetensors file there) and point every index
    entry of it there: the old reader opened it and called the checkpoint valid."""
    shard = shard_of(ckpt, FP8_WEIGHT)
    if where == "parent":
        dest, name = tmp_path / "elsewhere" / shard.name, f"../elsewhere/{shard.name}"
    elif where == "absolute":
        dest = tmp_path / "elsewhere" / shard.name
        name = str(dest)
    else:
        dest, name = ckpt / "sub" / shard.name, f"sub/{shard.name}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shard.rename(dest)
    index = json.loads((ckpt / INDEX_NAME).read_text())
    index["weight_map"] = {k: (name if v == shard.name else v) for k, v in index["weight_map"].items()}
    (ckpt / INDEX_NAME).write_text(json.dumps(index))
    first = min(k for k, v in index["weight_map"].items() if v == name)
    return dest, name, first


@pytest.mark.parametrize(
    "where, says",
    [
        ("parent", "outside the checkpoint folder"),
        ("absolute", "absolute path"),
        ("subfolder", "vLLM only looks at the checkpoint's top folder"),
    ],
)
@pytest.mark.parametrize("command", ["validate", "inspect", "dequant", "slice"])
def test_a_shard_outside_the_top_folder_is_refused(tiny_release, tmp_path, capsys, where, says, command):
    dest, name, first = move_shard(tiny_release, tmp_path, where)
    os.chmod(dest, 0)  # refused before it is opened: reading it would fail loudly
    try:
        before = snapshot(tiny_release)
        rc, out, err = run_cli(capsys, [], *COMMANDS[command](tiny_release, tmp_path))
        expect_refusal(command, rc, out, err, str(tiny_release / INDEX_NAME), first, repr(name), says)
        assert snapshot(tiny_release) == before
    finally:
        os.chmod(dest, 0o644)


# ---- item 7: a key twice in one header ----------------------------------------------------------


def write_raw_shard(path: Path, header_text: str, data: bytes) -> None:
    raw = header_text.encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_a_key_twice_in_a_header_is_named(tmp_path, capsys):
    """json.loads keeps the last of two equal keys; the old reader then reported a gap before y."""
    entry = '{{"dtype": "F32", "shape": [1], "data_offsets": [{}, {}]}}'
    header = f'{{"x": {entry.format(0, 4)}, "y": {entry.format(4, 8)}, "x": {entry.format(8, 12)}}}'
    path = tmp_path / "model.safetensors"
    write_raw_shard(path, header, bytes(12))
    with pytest.raises(DsV4Error, match=r"key x appears twice in the header"):
        read_header(path)
    rc, out, _ = run_cli(capsys, [], "validate", path)
    assert rc == 1 and "key x appears twice" in out and "key y" not in out, out


def test_field_names_used_as_keys_are_not_duplicates(tmp_path):
    """A tensor named like a header field only takes the slow check, which finds nothing."""
    tensors = {"dtype": torch.ones(2), "shape": torch.zeros(3), "data_offsets": torch.ones(1)}
    save_file(tensors, tmp_path / "a.safetensors", metadata={"note": '"dtype"'})
    assert set(read_header(tmp_path / "a.safetensors").tensors) == set(tensors)


# ---- item 7: quantization_config ----------------------------------------------------------------


@pytest.mark.parametrize(
    "quant, field",
    [
        ({"quant_method": "awq", "weight_block_size": [128, 128]}, "quantization_config.quant_method"),
        (None, "quantization_config"),
        ({"quant_method": "fp8", "weight_block_size": [0, "x"]}, "quantization_config.weight_block_size"),
    ],
    ids=["unknown-method", "missing", "bad-block-size"],
)
def test_a_quantization_config_that_does_not_describe_the_tensors(
    tiny_release, tmp_path, capsys, quant, field
):
    cfg_path = tiny_release / CONFIG_NAME
    config = json.loads(cfg_path.read_text())
    if quant is None:
        del config["quantization_config"]
    else:
        config["quantization_config"] = quant
    cfg_path.write_text(json.dumps(config))
    rc, out, _ = run_cli(capsys, [], "validate", tiny_release)
    assert rc == 1
    assert f"problem: {cfg_path}: key {field}: " in out, out
    # slice validates first, so it copies nothing on
    rc, _, err = run_cli(capsys, [], *COMMANDS["slice"](tiny_release, tmp_path))
    assert rc == 2 and str(cfg_path) in err and field in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ---- items 6 and 7: bad values the scale sample missed --------------------------------------------


@pytest.mark.parametrize(
    "what, byte, says",
    [("scale NaN", 0xFF, "NaN"), ("weight NaN", 0x7F, "NaN"), ("overflow", 0xFE, "too large for BF16")],
)
def test_dequant_stops_at_a_bad_value_before_its_shard_completes(
    tiny_release, tmp_path, capsys, unsampled, what, byte, says
):
    """UE8M0 0xFF is NaN; e4m3 0x7F is NaN; UE8M0 0xFE is 2^127, which times an FP8 value overflows."""
    if what == "weight NaN":
        key = edited = FP8_WEIGHT
    else:
        key, edited = FP8_WEIGHT, FP8_WEIGHT[: -len(".weight")] + ".scale"
        if what == "scale NaN":
            key = edited = mxfp4_scale_key(tiny_release)
    shard = shard_of(tiny_release, edited)
    rewrite_shard(shard, lambda t: set_bytes(t, edited, byte))
    if what == "overflow":  # make the first tile's first value nonzero
        rewrite_shard(shard, lambda t: set_bytes(t, key, 0x40))
    before = snapshot(tiny_release)
    out = tmp_path / "out"
    rc, _, err = run_cli(capsys, [], "dequant", tiny_release, out, "--quiet")
    assert_one_line_error(rc, err, str(shard), f"key {key}", says)
    assert snapshot(tiny_release) == before
    weight = key.removesuffix(".scale") + ".weight" if key.endswith(".scale") else key
    assert not complete_shards_holding(out, weight) and not (out / INDEX_NAME).exists()


@pytest.mark.parametrize("value", [0.0, math.nan, math.inf, -1.0], ids=["zero", "nan", "inf", "negative"])
def test_convert_names_an_unsampled_bad_weight_scale_2(exports, tmp_path, capsys, unsampled, value):
    """The w1/w3 unification step read every weight_scale_2 and raised ValueError on a bad one."""
    export = clone_replica(exports("experts", "X", "separate"), tmp_path / "export")
    tensors = Checkpoint.open(export).tensors
    key = min(k for k in tensors if ".experts." in k and k.endswith("w3.weight_scale_2"))
    shard = tensors[key].file
    rewrite_shard(shard, lambda t: t.__setitem__(key, torch.full_like(t[key], value)))
    out = tmp_path / "out"
    rc, _, err = run_cli(capsys, [], "convert", export, out, "--quiet")
    assert_one_line_error(rc, err, str(shard), f"key {key}", "scale is")
    assert not (out / INDEX_NAME).exists()


def test_an_action_refusing_a_value_names_the_file_and_key(tmp_path):
    """A ValueError from a format function (here fp8_block_quantize on NaN) becomes a DsV4Error."""
    info = TensorInfo("layers.0.attn.wq_a.weight", "BF16", (4, 4), tmp_path / "x.safetensors", 0, 32)
    job = Job(info.key, BF16_TO_FP8, "rule", (info.key, "layers.0.attn.wq_a.scale"), (info,))
    nan = torch.full((4, 4), math.nan, dtype=torch.bfloat16)
    with pytest.raises(DsV4Error, match=rf"{tmp_path / 'x.safetensors'}: key {info.key}: cannot "):
        run_action(job, [nan], torch.device("cpu"), RunStats())
