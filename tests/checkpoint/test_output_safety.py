"""Output safety (issue 13): --overwrite removes only what dsv4 wrote, --resume proves its inputs did not
change, one run per output folder, Ctrl-C and a read-only disk end in one line, and shards are fsynced
before they are renamed. Most cases run `dsv4 dequant` in-process on the micro release; the writer's own
cases use tests/checkpoint/test_checkpoint_writer.py's small plan."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from pathlib import Path

import pytest

from harness.checkpoints import tree_digest
from pipeline.checkpoint import INDEX_NAME, JOURNAL_NAME, LOCK_NAME, per_tensor, write_checkpoint
from pipeline.checkpoint import writer as writer_mod
from pipeline.cli import main as dsv4
from pipeline.errors import DsV4Error
from tests.checkpoint.test_checkpoint_writer import demo_plan, file_bytes, make_tensor, produce

pytestmark = pytest.mark.slow  # whole steps, several runs per test: kept out of the -m unit loop

SHARD_GIB = "0.001"  # the micro release in several output shards


def dequant(src: Path, dst: Path, *flags: str) -> int:
    return dsv4(
        ["dequant", str(src), str(dst), "--quiet", "--workers", "1", "--max-shard-gib", SHARD_GIB, *flags]
    )


def one_error_line(capsys) -> str:
    """stderr of the last command: exactly one line, no traceback."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def looks_unfinished(out: Path) -> None:
    """No index, a journal not marked complete, no partial or lock file left behind."""
    assert not (out / INDEX_NAME).exists()
    assert json.loads((out / JOURNAL_NAME).read_text())["complete"] is False
    assert not [p.name for p in out.iterdir() if p.name.endswith(".partial") or p.name == LOCK_NAME]


# ---- --overwrite removes only what a dsv4 run wrote -----------------------------------------------


def test_overwrite_refuses_a_folder_dsv4_did_not_write(tiny_release, tmp_path, capsys):
    """`dsv4 dequant SRC RELEASE --overwrite` (a slip): refused, naming what is there; nothing removed."""
    victim = tmp_path / "victim-release"
    shutil.copytree(tiny_release, victim)
    before = tree_digest(victim)
    assert dequant(tiny_release, victim, "--overwrite") == 2
    line = one_error_line(capsys)
    assert f"dsv4: error: {victim}: refusing --overwrite: this folder was not written by dsv4" in line
    assert "config.json" in line and "choose an empty or new folder" in line
    assert tree_digest(victim) == before


def test_overwrite_refuses_our_output_holding_a_stray_file(tiny_release, tmp_path, capsys):
    out = tmp_path / "out"
    assert dequant(tiny_release, out) == 0
    (out / "notes.txt").write_text("mine")
    before = tree_digest(out)
    assert dequant(tiny_release, out, "--overwrite") == 2
    line = one_error_line(capsys)
    assert "refusing --overwrite: it holds files dsv4 did not write (notes.txt" in line
    assert tree_digest(out) == before
    # what dsv4 itself adds beside its output (fix-config's backup, a killed write's temp file) is ours
    (out / "notes.txt").unlink()
    (out / "config.json.orig").write_text("{}")
    (out / ".config.json.partial").write_text("{")
    assert dequant(tiny_release, out, "--overwrite") == 0
    assert not (out / "config.json.orig").exists() and not (out / ".config.json.partial").exists()


def test_quantize_overwrite_refuses_a_folder_without_its_report(tmp_path):
    from pipeline.quantize import REPORT_NAME, check_output_paths

    src, dst = tmp_path / "bf16", tmp_path / "release"
    src.mkdir()
    dst.mkdir()
    (dst / "model-00001-of-00002.safetensors").write_bytes(b"release bytes")
    with pytest.raises(
        DsV4Error, match=r"refusing --overwrite: this folder was not written by dsv4 quantize"
    ):
        check_output_paths(src, dst, overwrite=True)
    (dst / REPORT_NAME).write_text("{}")
    check_output_paths(src, dst, overwrite=True)  # an export dsv4 quantize wrote may be replaced


# ---- --resume proves the input did not change ------------------------------------------------------


def _interrupted_run(src: Path, out: Path, monkeypatch) -> None:
    """A dequant run stopped by a failure three quarters of the way through (the micro release has some
    200 tensors in 9 output shards): some shards finished, no index."""
    import pipeline.dequant as d

    real, keys = d.convert, []

    def failing(source, device):
        keys.append(source.weight.key)
        if len(keys) == 150:
            raise DsV4Error("stop here")
        return real(source, device)

    monkeypatch.setattr(d, "convert", failing)
    assert dequant(src, out) == 2
    monkeypatch.setattr(d, "convert", real)
    assert json.loads((out / JOURNAL_NAME).read_text())["finished"]  # something to keep
    looks_unfinished(out)


def _flip_a_data_byte(shard: Path) -> None:
    """Change one byte of tensor data in place: same size, same header."""
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    with shard.open("r+b") as f:
        f.write(data)


@pytest.mark.parametrize("restore_mtime", [False, True], ids=["edited", "edited-mtime-restored"])
def test_resume_refuses_an_input_changed_since_the_run_began(
    tiny_release, tmp_path, monkeypatch, capsys, restore_mtime
):
    out = tmp_path / "out"
    _interrupted_run(tiny_release, out, monkeypatch)
    capsys.readouterr()
    shard = sorted(tiny_release.glob("*.safetensors"))[-1]
    st = shard.stat()
    _flip_a_data_byte(shard)
    if restore_mtime:
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))  # ctime still moves: cannot be set back
    before = tree_digest(out)
    assert dequant(tiny_release, out, "--resume") == 2
    line = one_error_line(capsys)
    changed = "ctime" if restore_mtime else "mtime, ctime"
    assert f"{shard} ({changed}): changed since the interrupted run began" in line
    assert "rerun with --overwrite" in line
    assert tree_digest(out) == before  # nothing kept or written from the other bytes
    assert dequant(tiny_release, out, "--overwrite") == 0  # the way out the message names


def test_resume_with_unchanged_input_keeps_the_shards(tiny_release, tmp_path, monkeypatch):
    out, reference = tmp_path / "out", tmp_path / "reference"
    assert dequant(tiny_release, reference) == 0
    _interrupted_run(tiny_release, out, monkeypatch)
    assert dequant(tiny_release, out, "--resume") == 0
    assert tree_digest(out) == tree_digest(reference)


def test_an_input_changed_while_being_read_leaves_no_index(tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "a.bin").write_bytes(b"1234")

    def editing(pt):
        if pt.key == "s2.t0":
            (inp / "a.bin").write_bytes(b"12345")
        return make_tensor(pt)

    out = tmp_path / "out"
    with pytest.raises(DsV4Error, match=rf"{inp / 'a.bin'} \(size, mtime, ctime\): changed while this run"):
        write_checkpoint(demo_plan(), out, per_tensor(editing), inputs=[inp])
    looks_unfinished(out)


# ---- one run per output folder -------------------------------------------------------------------


def test_a_second_run_is_refused_naming_the_holder(tiny_release, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    holder = {"pid": 4242, "host": "gpu-7", "started": "2025-01-01 00:00:00", "command": "dsv4 dequant A B"}
    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, json.dumps(holder).encode())
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for flags in ((), ("--resume",), ("--overwrite",)):
            assert dequant(tiny_release, out, *flags) == 2
            line = one_error_line(capsys)
            assert f"{out}: another dsv4 run is writing this folder (pid 4242 on gpu-7" in line
            assert "dsv4 dequant A B" in line
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # the holder's file untouched
        assert dequant(tiny_release, out, "--dry-run") == 0  # writes nothing: needs no lock
    finally:
        os.close(fd)
    assert dequant(tiny_release, out) == 0  # released: the folder is usable, the lock file ours
    assert not (out / LOCK_NAME).exists()


# ---- Ctrl-C -------------------------------------------------------------------------------------


def test_ctrl_c_says_what_is_kept_and_resume_finishes(tiny_release, tmp_path, monkeypatch, capsys):
    import pipeline.dequant as d

    out, reference = tmp_path / "out", tmp_path / "reference"
    assert dequant(tiny_release, reference) == 0
    index = json.loads((reference / INDEX_NAME).read_text())["weight_map"]
    shards = sorted(set(index.values()))
    victim = min(k for k, s in index.items() if s == shards[-1])  # first key of the last shard
    real = d.convert

    def interrupted(source, device):
        if source.weight.key == victim:
            raise KeyboardInterrupt  # as Ctrl-C lands: here in a worker, re-raised in the writer's thread
        return real(source, device)

    monkeypatch.setattr(d, "convert", interrupted)
    capsys.readouterr()
    assert dequant(tiny_release, out) == 130
    line = one_error_line(capsys)
    assert line == (
        f"dsv4: interrupted: {len(shards) - 1} of {len(shards)} shards of {out} are finished and kept; "
        "rerun the same command with --resume to continue"
    )
    looks_unfinished(out)
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards[:-1]
    monkeypatch.setattr(d, "convert", real)
    assert dequant(tiny_release, out, "--resume") == 0
    assert tree_digest(out) == tree_digest(reference)


# ---- OSError: one line, the first error, nothing complete-looking ----------------------------------


def _fail_on(monkeypatch, name: str, when, err: int = errno.EROFS) -> None:
    """Make os.<name> raise OSError(err) when ``when(first argument)`` holds."""
    real = getattr(os, name)

    def failing(*args, **kwargs):
        if when(str(args[0])):
            raise OSError(err, os.strerror(err), str(args[0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(os, name, failing)


def _is_partial_shard(path: str) -> bool:
    return path.endswith(".safetensors.partial")


def test_read_only_output_is_one_line_naming_the_shard(tiny_release, tmp_path, monkeypatch, capsys):
    before = tree_digest(tiny_release)
    out = tmp_path / "out"
    _fail_on(monkeypatch, "open", _is_partial_shard)
    assert dequant(tiny_release, out) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"dsv4: error: {out}/model-00001-of-")
    assert "the file system is read-only while writing" in line
    assert "choose a DST on a writable file system" in line
    looks_unfinished(out)
    assert tree_digest(tiny_release) == before


def test_a_failing_cleanup_does_not_hide_the_first_error(tiny_release, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    _fail_on(monkeypatch, "replace", _is_partial_shard)  # the rename fails ...
    _fail_on(monkeypatch, "unlink", _is_partial_shard, errno.EACCES)  # ... and so does removing the partial
    assert dequant(tiny_release, out) == 2
    line = one_error_line(capsys)
    assert "the file system is read-only while writing" in line  # the rename's error, not the unlink's
    assert "could not be removed either (Permission denied)" in line
    assert not (out / INDEX_NAME).exists()


def test_an_output_dir_that_cannot_be_created_is_one_line(tiny_release, tmp_path, monkeypatch, capsys):
    out = tmp_path / "ro" / "out"
    _fail_on(monkeypatch, "mkdir", lambda p: p.startswith(str(tmp_path / "ro")))
    assert dequant(tiny_release, out) == 2
    line = one_error_line(capsys)
    assert f"{out}: the file system is read-only while creating the output directory" in line


def test_an_os_error_no_step_caught_is_still_one_line(tiny_release, tmp_path, monkeypatch, capsys):
    import pipeline.dequant as d

    gone = str(tiny_release / "model-00001-of-00002.safetensors")

    def vanished(info):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", gone)

    monkeypatch.setattr(d, "read_tensor", vanished)
    assert dequant(tiny_release, tmp_path / "out") == 2
    assert one_error_line(capsys) == f"dsv4: error: {gone}: No such file or directory"


# ---- shards are durable before they get their final name --------------------------------------------


def test_each_shard_is_fsynced_before_its_rename_and_the_dir_after(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    fd_path: dict[int, str] = {}
    real_open, real_fsync, real_replace = os.open, os.fsync, os.replace

    def open_(path, *args, **kwargs):
        fd = real_open(path, *args, **kwargs)
        fd_path[fd] = str(path)
        return fd

    def fsync(fd):
        events.append(("fsync", fd_path.get(fd, "?")))
        return real_fsync(fd)

    def replace(src, dst, *args, **kwargs):
        events.append(("replace", str(src)))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "out"
    write_checkpoint(demo_plan(), out, produce)
    for sh in demo_plan().shards:
        partial = str(out / f".{sh.name}.partial")
        renamed = events.index(("replace", partial))
        assert ("fsync", partial) in events[:renamed], f"{sh.name} renamed before its data was fsynced"
        after = events[renamed + 1 :]
        following = next((i for i, e in enumerate(after) if e[0] == "replace"), len(after))
        # before the next rename (the journal's own): its directory fsync must not count for this shard
        assert ("fsync", str(out)) in after[:following], f"{sh.name}: the directory not fsynced after"
    assert file_bytes(out)  # and it still wrote the checkpoint


def test_writer_lock_file_is_removed_and_a_stale_one_is_ours(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text('{"pid": 1}')  # left by a killed run: no flock held on it
    write_checkpoint(demo_plan(), out, produce)  # neither "not empty" nor blocked
    assert not (out / LOCK_NAME).exists()
    assert writer_mod.LOCK_NAME == LOCK_NAME
