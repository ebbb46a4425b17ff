"""pipeline.checkpoint writer: planned headers, crash-safe shards, resume, and every refusal."""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import time
import zlib
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from harness.checkpoints import tree_digest
from pipeline.checkpoint import (
    INDEX_NAME,
    JOURNAL_NAME,
    Checkpoint,
    OutputPlan,
    PlannedTensor,
    ShardPlan,
    atomic,
    copy_file_atomic,
    digest,
    dtypes,
    per_tensor,
    plan_shards,
    read_header,
    write_checkpoint,
)
from pipeline.errors import DsV4Error

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
BLOCK_KEY = "s1.t2"  # the child blocks before producing this tensor, mid-way through shard 2


def demo_plan() -> OutputPlan:
    specs = [("BF16", (256, 256)), ("F8_E8M0", (64, 72)), ("I8", (128, 512)), ("F32", ()), ("U8", (0, 8))]
    shards = []
    for s in range(3):
        tensors = tuple(PlannedTensor(f"s{s}.t{j}", dt, shape) for j, (dt, shape) in enumerate(specs))
        shards.append(ShardPlan(f"model-{s + 1:05d}-of-00003.safetensors", tensors))
    return OutputPlan(tuple(shards))


def make_tensor(pt: PlannedTensor) -> torch.Tensor:
    """Deterministic bytes per key, viewed as the planned dtype."""
    g = torch.Generator().manual_seed(zlib.crc32(pt.key.encode()))
    raw = torch.randint(0, 256, (pt.nbytes,), generator=g, dtype=torch.uint8)
    return raw.view(dtypes.to_torch(pt.dtype)).reshape(pt.shape)


produce = per_tensor(make_tensor)


def file_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def looks_complete(d: Path, plan: OutputPlan) -> list[str]:
    """Names in ``d`` that would let a loader take it for a finished checkpoint."""
    return sorted(p.name for p in d.iterdir() if p.name == INDEX_NAME) if d.exists() else []


def _child_main(out: str, marker: str) -> None:  # pragma: no cover - runs in the killed subprocess
    def slow(pt: PlannedTensor) -> torch.Tensor:
        if pt.key == BLOCK_KEY:
            Path(marker).touch()
            time.sleep(120)
        return make_tensor(pt)

    write_checkpoint(demo_plan(), out, per_tensor(slow))


@pytest.fixture(scope="module")
def reference_output(tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("ref") / "out"
    write_checkpoint(demo_plan(), out, produce)
    return file_bytes(out)


def test_header_is_deterministic_and_safetensors_reads_the_output(tmp_path, reference_output):
    plan = demo_plan()
    assert plan.shards[0].header_bytes == demo_plan().shards[0].header_bytes
    assert len(plan.shards[0].header_bytes) % 8 == 0
    out = tmp_path / "out"
    result = write_checkpoint(plan, out, produce)
    assert result.written == [sh.name for sh in plan.shards] and result.skipped == []
    assert file_bytes(out) == reference_output
    for sh in plan.shards:
        assert (out / sh.name).stat().st_size == sh.file_size
        loaded = load_file(out / sh.name)  # safetensors reads what we wrote
        assert list(read_header(out / sh.name).tensors) == [t.key for t in sh.tensors]
        for t in sh.tensors:
            want = make_tensor(t)
            assert loaded[t.key].dtype == want.dtype and loaded[t.key].shape == want.shape
            assert torch.equal(
                loaded[t.key].reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)
            )
    index = json.loads((out / INDEX_NAME).read_text())
    assert index["weight_map"] == dict(sorted(plan.weight_map.items()))
    assert index["metadata"]["total_size"] == plan.tensor_bytes
    journal = json.loads((out / JOURNAL_NAME).read_text())
    assert journal["complete"] is True and set(journal["finished"]) == {sh.name for sh in plan.shards}
    assert Checkpoint.open(out).total_bytes == plan.tensor_bytes


def test_plan_shards_splits_by_size_and_refuses_duplicates():
    ts = [PlannedTensor(f"k{i}", "U8", (100,)) for i in range(10)]
    plan = plan_shards(ts, max_shard_bytes=250)
    assert [len(s.tensors) for s in plan.shards] == [2, 2, 2, 2, 2]
    assert plan.shards[-1].name == "model-00005-of-00005.safetensors"
    with pytest.raises(DsV4Error, match="key k0 planned in both"):
        OutputPlan((ShardPlan("a.safetensors", (ts[0],)), ShardPlan("b.safetensors", (ts[0],))))


def test_resume_redoes_a_finished_shard_that_no_longer_matches(tmp_path, reference_output):
    out = tmp_path / "out"
    write_checkpoint(demo_plan(), out, produce)
    target = out / "model-00003-of-00003.safetensors"
    data = bytearray(target.read_bytes())
    data[-5] ^= 0xFF
    target.write_bytes(bytes(data))
    result = write_checkpoint(demo_plan(), out, produce, resume=True)
    assert result.written == ["model-00003-of-00003.safetensors"]
    assert file_bytes(out) == reference_output
    # and a complete output resumes to a no-op
    assert write_checkpoint(demo_plan(), out, produce, resume=True).written == []


def test_resume_refuses_a_journal_of_another_plan(tmp_path):
    out = tmp_path / "out"
    write_checkpoint(demo_plan(), out, produce)
    other = OutputPlan(demo_plan().shards[:2])
    with pytest.raises(DsV4Error, match=rf"{JOURNAL_NAME}: the unfinished output was planned differently"):
        write_checkpoint(other, out, produce, resume=True)


def test_producer_error_leaves_nothing_complete_looking(tmp_path):
    out = tmp_path / "out"

    def failing(pt):
        if pt.key == "s1.t1":
            raise RuntimeError("boom")
        return make_tensor(pt)

    with pytest.raises(RuntimeError, match="boom"):
        write_checkpoint(demo_plan(), out, per_tensor(failing))
    assert sorted(p.name for p in out.iterdir()) == [JOURNAL_NAME, "model-00001-of-00003.safetensors"]


def test_full_disk_gives_a_clear_error_and_no_complete_output(tmp_path, monkeypatch):
    out = tmp_path / "out"
    real = atomic._write_all
    calls = {"n": 0}

    def write_until_full(fd, data):
        calls["n"] += 1
        if calls["n"] == 10:  # inside shard 2 (shard 1 takes 1 header + 5 tensor writes, plus journal writes)
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data)

    monkeypatch.setattr(atomic, "_write_all", write_until_full)
    with pytest.raises(
        DsV4Error, match=r"model-00002-of-00003.safetensors: key s1\.t\d: no space left on device"
    ):
        write_checkpoint(demo_plan(), out, produce)
    names = {p.name for p in out.iterdir()}
    assert INDEX_NAME not in names and "model-00002-of-00003.safetensors" not in names
    assert not [n for n in names if n.endswith(".partial")]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (
            lambda pt: make_tensor(pt).float() if pt.key == "s0.t1" else make_tensor(pt),
            r"key s0\.t1: produced dtype",
        ),
        (
            lambda pt: make_tensor(pt).reshape(-1) if pt.key == "s0.t0" else make_tensor(pt),
            r"key s0\.t0: produced shape",
        ),
    ],
    ids=["dtype", "shape"],
)
def test_produced_tensor_must_match_the_plan(tmp_path, bad, message):
    with pytest.raises(DsV4Error, match=message):
        write_checkpoint(demo_plan(), tmp_path / "out", per_tensor(bad))
    assert looks_complete(tmp_path / "out", demo_plan()) == []


def test_producer_yielding_the_wrong_key_is_named(tmp_path):
    def swapped(shard):
        for pt in reversed(shard.tensors):
            yield pt.key, make_tensor(pt)

    with pytest.raises(DsV4Error, match=r"key s0\.t0: the producer yielded 's0\.t4' in its place"):
        write_checkpoint(demo_plan(), tmp_path / "out", swapped)


def test_output_inside_or_around_input_is_refused(tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "x.safetensors").write_bytes(b"keep")
    before = tree_digest(inp)
    for out in (inp, inp / "sub", inp / "sub" / ".." / "sub2"):
        with pytest.raises(DsV4Error, match="refusing to write the output inside the input"):
            write_checkpoint(demo_plan(), out, produce, inputs=[inp])
    with pytest.raises(DsV4Error, match="contains the input"):
        write_checkpoint(demo_plan(), tmp_path, produce, inputs=[inp], overwrite=True)
    assert tree_digest(inp) == before and sorted(p.name for p in inp.iterdir()) == ["x.safetensors"]


def test_non_empty_output_needs_resume_or_overwrite(tmp_path, reference_output):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.safetensors").write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(
        DsV4Error, match=rf"{out}: output directory is not empty \(notes.txt, stale.safetensors\)"
    ):
        write_checkpoint(demo_plan(), out, produce)
    before = file_bytes(out)
    with pytest.raises(DsV4Error, match=r"refusing --overwrite: this folder was not written by dsv4"):
        write_checkpoint(demo_plan(), out, produce, overwrite=True)
    assert file_bytes(out) == before  # refused whole: nothing removed
    (out / "notes.txt").unlink()
    (out / "stale.safetensors").unlink()
    write_checkpoint(demo_plan(), out, produce)
    write_checkpoint(OutputPlan(demo_plan().shards[:1]), out, produce, overwrite=True)  # our own: replaced
    write_checkpoint(demo_plan(), out, produce, overwrite=True)
    assert file_bytes(out) == reference_output


def test_not_enough_disk_is_refused_before_writing(tmp_path, monkeypatch):
    Usage = namedtuple("Usage", "total used free")
    need = demo_plan().total_bytes
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10 * need, 9 * need, need // 2))
    out = tmp_path / "out"
    with pytest.raises(
        DsV4Error, match=r"not enough free disk space: the output needs .* GiB more \(3 shard"
    ):
        write_checkpoint(demo_plan(), out, produce)
    assert not out.exists()


def test_copy_file_atomic(tmp_path):
    src = tmp_path / "config.json"
    src.write_text('{"a": 1}')
    out = tmp_path / "out"
    out.mkdir()
    assert copy_file_atomic(src, out).read_text() == '{"a": 1}'
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]


def test_extra_files_are_copied_before_the_index(tmp_path):
    src = tmp_path / "config.json"
    src.write_text("{}")
    out = tmp_path / "out"
    write_checkpoint(demo_plan(), out, produce, extra_files=[src])
    assert (out / "config.json").read_text() == "{}"


def test_producer_oserror_is_not_reported_as_a_write_error(tmp_path):
    def unreadable(pt):
        raise FileNotFoundError(2, "No such file or directory", "/input/shard.safetensors")

    with pytest.raises(FileNotFoundError, match=r"/input/shard\.safetensors"):
        write_checkpoint(demo_plan(), tmp_path / "out", per_tensor(unreadable))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [JOURNAL_NAME]


def test_resume_without_a_journal_refuses_a_non_empty_dir(tmp_path, reference_output):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model-00001-of-00003.safetensors").write_bytes(b"not ours")
    with pytest.raises(DsV4Error, match=r"nothing to resume \(no \.dsv4-progress\.json\)"):
        write_checkpoint(demo_plan(), out, produce, resume=True)
    # an empty (or missing) directory is fine to "resume": it starts from the beginning
    write_checkpoint(demo_plan(), tmp_path / "fresh", produce, resume=True)
    assert file_bytes(tmp_path / "fresh") == reference_output


def test_the_journal_records_each_shards_digest_and_resumes_a_journal_from_before(
    tmp_path, reference_output, monkeypatch
):
    monkeypatch.setattr(digest, "PIECE_BYTES", 4096)  # each shard many pieces
    out = tmp_path / "out"
    write_checkpoint(demo_plan(), out, produce)
    journal = json.loads((out / JOURNAL_NAME).read_text())
    for name, rec in journal["finished"].items():
        data = (out / name).read_bytes()
        pieces = [hashlib.sha256(data[i : i + 4096]).digest() for i in range(0, len(data), 4096)]
        assert rec == {"size": len(data), digest.FIELD: hashlib.sha256(b"".join(pieces)).hexdigest()}
    # a run interrupted before the hash list, its journal holding one sha256 per shard: kept on --resume
    journal["complete"] = False
    journal["finished"] = {
        name: {"size": rec["size"], "sha256": hashlib.sha256((out / name).read_bytes()).hexdigest()}
        for name, rec in journal["finished"].items()
    }
    (out / JOURNAL_NAME).write_text(json.dumps(journal))
    (out / INDEX_NAME).unlink()
    assert write_checkpoint(demo_plan(), out, produce, resume=True).written == []
    made = {k: v for k, v in file_bytes(out).items() if k != JOURNAL_NAME}
    assert made == {k: v for k, v in reference_output.items() if k != JOURNAL_NAME}
    # and one changed byte in a kept shard: that shard alone is made again
    name = sorted(journal["finished"])[1]
    data = bytearray((out / name).read_bytes())
    data[-1] ^= 1
    (out / name).write_bytes(data)
    (out / INDEX_NAME).unlink()
    journal = json.loads((out / JOURNAL_NAME).read_text())
    journal["complete"] = False
    (out / JOURNAL_NAME).write_text(json.dumps(journal))
    assert write_checkpoint(demo_plan(), out, produce, resume=True).written == [name]


class _Stream:
    """An AcrossShards producer over make_tensor that records what the writer asked of it."""

    def __init__(self, extra: bool = False, fail_at: str | None = None, stop_at: str | None = None) -> None:
        self.calls: list[list[str]] = []
        self.closed = False
        self.extra, self.fail_at, self.stop_at = extra, fail_at, stop_at

    def _stream(self, shards):
        self.calls.append([sh.name for sh in shards])
        try:
            for sh in shards:
                for pt in sh.tensors:
                    if pt.key == self.fail_at:
                        raise RuntimeError("boom")
                    if pt.key == self.stop_at:
                        return
                    yield pt.key, make_tensor(pt)
            if self.extra:
                yield "one.too.many", torch.zeros(1)
        finally:
            self.closed = True

    def producer(self):
        from pipeline.checkpoint import AcrossShards

        return AcrossShards(self._stream)


def test_a_producer_across_shards_is_asked_once_for_every_shard_to_write(tmp_path, reference_output):
    out = tmp_path / "out"
    whole = _Stream()
    write_checkpoint(demo_plan(), out, whole.producer())
    assert whole.calls == [[sh.name for sh in demo_plan().shards]] and whole.closed
    assert file_bytes(out) == reference_output
    # resumed, it is asked for the shards left to write only, and writes the same bytes
    (out / "model-00002-of-00003.safetensors").unlink()
    resumed = _Stream()
    assert write_checkpoint(demo_plan(), out, resumed.producer(), resume=True).written == [
        "model-00002-of-00003.safetensors"
    ]
    assert resumed.calls == [["model-00002-of-00003.safetensors"]]
    assert file_bytes(out) == reference_output


def test_a_producer_across_shards_is_closed_on_an_error_and_its_extras_refused(tmp_path):
    failing = _Stream(fail_at="s1.t1")
    with pytest.raises(RuntimeError, match="boom"):
        write_checkpoint(demo_plan(), tmp_path / "a", failing.producer())
    assert failing.closed
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        JOURNAL_NAME,
        "model-00001-of-00003.safetensors",
    ]
    with pytest.raises(
        DsV4Error, match=r"key one\.too\.many: the producer yielded more tensors than the shards plan"
    ):
        write_checkpoint(demo_plan(), tmp_path / "b", _Stream(extra=True).producer())
    # stopping short is named with the key it did not yield
    with pytest.raises(DsV4Error, match=r"key s2\.t3: the producer stopped before yielding it"):
        write_checkpoint(demo_plan(), tmp_path / "c", _Stream(stop_at="s2.t3").producer())
