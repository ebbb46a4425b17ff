"""pipeline.checkpoint reader: hand-parsed headers and seek+read tensors agree with safetensors' own."""

from __future__ import annotations

import json
import re

import pytest
import safetensors.torch as st
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from harness.checkpoints import tree_digest
from pipeline.checkpoint import INDEX_NAME, Checkpoint, dtypes, locate, read_header, read_tensor
from pipeline.errors import DsV4Error

pytestmark = pytest.mark.unit


def _sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    raw = lambda n: torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8)  # noqa: E731
    return {
        "bf16": torch.randn(3, 5, generator=g).bfloat16(),
        "f16": torch.randn(7, generator=g).half(),
        "f32": torch.randn(2, 3, 4, generator=g),
        "f64": torch.randn(2, generator=g).double(),
        "fp8_e4m3": raw(24).view(torch.float8_e4m3fn).reshape(4, 6),
        "fp8_e5m2": raw(8).view(torch.float8_e5m2),
        "ue8m0": raw(12).view(torch.float8_e8m0fnu).reshape(3, 4),
        "i8": raw(10).view(torch.int8).reshape(2, 5),
        "u8": raw(9),
        "i16": torch.randint(-300, 300, (4,), generator=g, dtype=torch.int16),
        "i32": torch.randint(-(2**31), 2**31 - 1, (3,), generator=g, dtype=torch.int32),
        "i64": torch.randint(-(2**40), 2**40, (2, 2), generator=g, dtype=torch.int64),
        "bool": torch.tensor([True, False, True]),
        "scalar_f32": torch.tensor(3.5),
        "empty": torch.empty(0, 4, dtype=torch.bfloat16),
    }


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(
            a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)
        )
    )


def test_dtype_table_agrees_with_safetensors():
    # safetensors' own Python table (0.8) lacks F8_E8M0, which its Rust core reads; ours must have it.
    for name, torch_dtype in st._TYPES.items():
        if name in dtypes.BY_NAME:
            assert dtypes.to_torch(name) == torch_dtype, name
    assert dtypes.to_torch("F8_E8M0") == torch.float8_e8m0fnu
    assert dtypes.to_torch("F8_E4M3") == torch.float8_e4m3fn
    for d in dtypes.BY_NAME.values():
        assert dtypes.from_torch(d.torch) == d.name
        assert torch.empty(0, dtype=d.torch).element_size() == d.itemsize
    with pytest.raises(DsV4Error, match="unknown safetensors dtype 'F4'"):
        dtypes.lookup("F4", where="x.safetensors: key k")


def test_header_and_tensors_round_trip_against_save_file(tmp_path):
    tensors = _sample_tensors()
    path = tmp_path / "one.safetensors"
    save_file(tensors, path, metadata={"format": "pt", "note": "x"})
    before = tree_digest(tmp_path)

    header = read_header(path)
    assert header.metadata == {"format": "pt", "note": "x"}
    assert header.file_size == path.stat().st_size
    assert set(header.tensors) == set(tensors)
    with safe_open(path, "pt") as f:
        for key, t in tensors.items():
            info = header.tensors[key]
            assert info.shape == tuple(t.shape), key
            assert info.torch_dtype == t.dtype, key
            assert info.dtype == dtypes.from_torch(t.dtype)
            assert info.nbytes == t.numel() * t.element_size()
            got = read_tensor(info)
            assert _same_bytes(got, t), key
            assert _same_bytes(got, f.get_tensor(key)), key
    assert tree_digest(tmp_path) == before


def test_checkpoint_open_by_dir_index_file_or_single_file(tmp_path):
    tensors = _sample_tensors()
    keys = sorted(tensors)
    shards = {"a.safetensors": keys[:6], "b.safetensors": keys[6:]}
    for name, ks in shards.items():
        save_file({k: tensors[k] for k in ks}, tmp_path / name)
    before = tree_digest(tmp_path)

    # by *.safetensors (no index)
    ck = Checkpoint.open(tmp_path)
    assert ck.index_path is None and list(ck.shards) == ["a.safetensors", "b.safetensors"]
    assert set(ck.tensors) == set(tensors)
    # by index, given as the directory or as the file
    wm = {k: n for n, ks in shards.items() for k in ks}
    (tmp_path / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    for where in (tmp_path, tmp_path / INDEX_NAME):
        ck = Checkpoint.open(where)
        assert ck.index_path == tmp_path / INDEX_NAME
        assert {k: i.file.name for k, i in ck.tensors.items()} == wm
        seen = dict(ck.iter_tensors())
        assert set(seen) == set(tensors)
        assert all(_same_bytes(seen[k], tensors[k]) for k in tensors)
        assert _same_bytes(ck.read("i64"), tensors["i64"])
    # a single file
    ck = Checkpoint.open(tmp_path / "b.safetensors")
    assert set(ck.tensors) == set(shards["b.safetensors"])
    assert ck.total_bytes == sum(
        tensors[k].numel() * tensors[k].element_size() for k in shards["b.safetensors"]
    )
    (tmp_path / INDEX_NAME).unlink()
    assert tree_digest(tmp_path) == {k: v for k, v in before.items()}


def test_open_refuses_index_and_shard_disagreeing(tmp_path):
    save_file({"a": torch.zeros(2)}, tmp_path / "x.safetensors")
    (tmp_path / INDEX_NAME).write_text(
        json.dumps({"weight_map": {"a": "x.safetensors", "b": "x.safetensors"}})
    )
    with pytest.raises(DsV4Error, match=r"key b: the index names x.safetensors, which does not hold it"):
        Checkpoint.open(tmp_path)


def test_locate_errors_name_the_path(tmp_path):
    with pytest.raises(DsV4Error, match=re.escape(f"{tmp_path / 'nope'}: no such file")):
        locate(tmp_path / "nope")
    with pytest.raises(DsV4Error, match=r"no model\.safetensors\.index\.json and no"):
        locate(tmp_path)


def test_header_errors_name_file_and_key(tmp_path):
    path = tmp_path / "s.safetensors"
    save_file({"k1": torch.zeros(4), "k2": torch.ones(8)}, path)
    data = path.read_bytes()
    path.write_bytes(data[:-3])
    with pytest.raises(DsV4Error, match=rf"{re.escape(str(path))}: truncated: .*key k2 ends past the end"):
        read_header(path)
    path.write_bytes(data + b"\0")
    with pytest.raises(DsV4Error, match="1 bytes after the last tensor"):
        read_header(path)
    path.write_bytes(data[:3])
    with pytest.raises(DsV4Error, match="too short"):
        read_header(path)
    n = int.from_bytes(data[:8], "little")
    bad = data[:8] + data[8 : 8 + n].replace(b'"shape":[8]', b'"shape":[9]') + data[8 + n :]
    path.write_bytes(bad)
    with pytest.raises(DsV4Error, match=r"key k2: data_offsets .* span 32 bytes but F32 \[9\] needs 36"):
        read_header(path)
