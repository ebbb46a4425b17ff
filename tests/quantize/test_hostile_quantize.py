"""Hostile inputs (issue 13) for `dsv4 quantize`, in the quant env (ModelOpt 0.47, transformers 5.23).

Each case runs `dsv4 quantize` in this process on the micro BF16 checkpoint (or a private copy of it made
hostile) and asserts the contract of harness.hostile.assert_refused: exit 2, one `dsv4: error:` line
naming the file, folder or patch target, no traceback, every byte of the inputs and of any folder the
step must leave alone unchanged, and no export (DST, DST.calibration/, .DST.partial/) left behind. Every
refusal must come before the model is loaded (a guard fails the case if it is not). Two runs into one DST (class 3): the first is a real `dsv4 quantize`
process held after ModelOpt's export and frozen while second runs go in, as in
tests/cli/test_hostile_concurrent.py.
"""

from __future__ import annotations

import os
import shutil
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from harness import hostile as H
from harness.checkpoints import tree_digest
from patches import modelopt_patches
from pipeline.quantize import REPORT_NAME, STATE_SUFFIX

pytestmark = [pytest.mark.tiny, pytest.mark.quant]

ROOT = Path(__file__).resolve().parents[2]

CALIB = ("--calib-size", "4", "--calib-seq", "16", "--device", "cpu")


def quantize(src: Path, dst: Path, *extra: object) -> list[str]:
    return ["quantize", str(src), str(dst), *CALIB, *map(str, extra)]


def leftovers(dst: Path) -> list[Path]:
    """What a run into ``dst`` writes besides DST itself: its calibrated state and its partial export."""
    return [dst.with_name(dst.name + STATE_SUFFIX), dst.with_name(f".{dst.name}.partial")]


def refused(argv, capsys, *, names, protected, fifos=(), absent=()) -> None:
    before = H.snapshot(*protected)
    outcome = H.run_dsv4(argv, capsys, fifos=fifos)
    H.assert_refused(outcome, names=names, before=before, protected=protected)
    made = [str(p) for p in absent if os.path.lexists(p)]
    assert not made, f"left behind: {made}\n{outcome.show()}"


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the case if the step gets as far as loading the model (the refusal must come first)."""
    import pipeline.quantize as q

    def loaded(*args, **kwargs):
        raise AssertionError("dsv4 quantize loaded the model before refusing")

    monkeypatch.setattr(q, "load_bf16_model", loaded)


@pytest.fixture
def bf16_copy(micro_bf16, tmp_path) -> Path:
    """A private copy of the micro BF16 checkpoint, to make hostile."""
    return H.copy_tree(micro_bf16, tmp_path / "in" / "bf16")


# ---- DST is not a folder the step may write ------------------------------------------------------------


def _file(p: Path) -> None:
    p.write_text('{"not": "an export"}\n')


def _fifo(p: Path) -> None:
    os.mkfifo(p)


def _link_to_file(p: Path) -> None:
    target = p.with_name("target.json")
    target.write_text("{}\n")
    p.symlink_to(target)


NOT_A_FOLDER = {"file": _file, "fifo": _fifo, "link-to-file": _link_to_file}


@pytest.mark.parametrize("kind", list(NOT_A_FOLDER))
def test_destination_that_is_not_a_folder_is_refused(kind, micro_bf16, tmp_path, capsys, no_model_load):
    dst = tmp_path / "dst" / "export"
    dst.parent.mkdir()
    NOT_A_FOLDER[kind](dst)
    refused(
        quantize(micro_bf16, dst),
        capsys,
        names=[dst],
        protected=[micro_bf16, dst.parent],
        fifos=[dst] if kind == "fifo" else (),
        absent=leftovers(dst),
    )


# ---- --overwrite of a folder dsv4 quantize did not write --------------------------------------------------


def _notes(dst: Path, masters) -> None:
    dst.mkdir()
    (dst / "notes.txt").write_text("a week of results\n")
    (dst / "runs").mkdir()
    (dst / "runs" / "loss.csv").write_text("step,loss\n1,2.5\n")


def _release(dst: Path, masters) -> None:  # the slip: `dsv4 quantize BF16 RELEASE --overwrite`
    shutil.copytree(masters["release"], dst)


def _dequant_output(dst: Path, masters) -> None:  # written by dsv4 (a journal), not by dsv4 quantize
    shutil.copytree(masters["bf16"], dst)


def _report_is_a_folder(dst: Path, masters) -> None:
    _notes(dst, masters)
    (dst / REPORT_NAME).mkdir()


FOREIGN = {
    "notes": _notes,
    "release": _release,
    "dequant-output": _dequant_output,
    "report-is-a-folder": _report_is_a_folder,
}


@pytest.mark.parametrize("kind", list(FOREIGN))
def test_overwrite_of_a_folder_dsv4_quantize_did_not_write_is_refused(
    kind, micro_bf16, micro_release, tmp_path, capsys, no_model_load
):
    dst = tmp_path / "dst" / "export"
    dst.parent.mkdir()
    FOREIGN[kind](dst, {"release": micro_release, "bf16": micro_bf16})
    refused(
        quantize(micro_bf16, dst, "--overwrite"),
        capsys,
        names=[dst],
        protected=[micro_bf16, dst.parent],
        absent=leftovers(dst),
    )


def test_non_empty_destination_without_overwrite_is_refused(micro_bf16, tmp_path, capsys, no_model_load):
    dst = tmp_path / "dst" / "export"
    dst.parent.mkdir()
    _notes(dst, {})
    refused(
        quantize(micro_bf16, dst),
        capsys,
        names=[dst],
        protected=[micro_bf16, dst.parent],
        absent=leftovers(dst),
    )


def test_a_foreign_folder_where_the_calibrated_state_goes_is_refused(micro_bf16, tmp_path, capsys):
    dst = tmp_path / "dst" / "export"
    dst.parent.mkdir()
    state = dst.with_name(dst.name + STATE_SUFFIX)
    _notes(state, {})
    refused(quantize(micro_bf16, dst), capsys, names=[state], protected=[micro_bf16, state], absent=[dst])


# ---- an input file that is a FIFO or a folder --------------------------------------------------------


@pytest.mark.parametrize("kind", list(H.NON_REGULAR))
@pytest.mark.parametrize("target", ["config", "index", "shard"])
def test_non_regular_input_file_is_refused_without_hanging(
    target, kind, bf16_copy, tmp_path, capsys, no_model_load
):
    path = H.NON_REGULAR[kind](H.target_file(bf16_copy, target))
    dst = tmp_path / "dst" / "export"
    refused(
        quantize(bf16_copy, dst),
        capsys,
        names=[path.name],
        protected=[bf16_copy],
        fifos=[path] if kind == "fifo" else (),
        absent=[dst.parent, *leftovers(dst)],
    )


def _calib_fifo(p: Path) -> list[Path]:
    os.mkfifo(p)
    return [p]


def _calib_dir(p: Path) -> list[Path]:
    p.mkdir()
    return []


def _calib_bytes(data: bytes) -> Callable[[Path], list[Path]]:
    def write(p: Path) -> list[Path]:
        p.write_bytes(data)
        return []

    return write


# kind -> make the --calib-file, returning the FIFOs among it
BAD_CALIB: dict[str, Callable[[Path], list[Path]]] = {
    "fifo": _calib_fifo,
    "dir": _calib_dir,
    "not-utf8": _calib_bytes(b"\xff\xfe\x00binary, e.g. a shard passed by mistake\n"),
    "ids-not-integers": _calib_bytes(b'{"input_ids": ["a", "b"]}\n'),
    "line-not-an-object": _calib_bytes(b"5\n"),
}


@pytest.mark.parametrize("kind", list(BAD_CALIB))
def test_calibration_file_it_cannot_use_is_refused_before_loading(
    kind, micro_bf16, tmp_path, capsys, no_model_load
):
    calib = tmp_path / "calib" / "samples.jsonl"
    calib.parent.mkdir()
    fifos = BAD_CALIB[kind](calib)
    dst = tmp_path / "dst" / "export"
    refused(
        quantize(micro_bf16, dst, "--calib-file", calib),
        capsys,
        names=[calib],
        protected=[micro_bf16, calib.parent],
        fifos=fifos,
        absent=[dst.parent, *leftovers(dst)],
    )


# ---- a ModelOpt whose patch target moved -------------------------------------------------------------


def _owner(patch: modelopt_patches.Patch) -> tuple[object, str]:
    import importlib

    owner: object = importlib.import_module(patch.target.module)
    *path, attr = patch.target.qualname.split(".")
    for part in path:
        owner = getattr(owner, part)
    return owner, attr


def drift(monkeypatch, patch: modelopt_patches.Patch, how: str) -> None:
    """What a ModelOpt release that moved ``patch``'s target looks like: the attribute gone, or there with
    another signature (a classmethod stays one)."""
    owner, attr = _owner(patch)
    if how == "gone":
        monkeypatch.delattr(owner, attr)
        return

    def moved(*args, **kwargs):
        raise AssertionError("the drifted target was called")

    raw = vars(owner).get(attr) if isinstance(owner, type) else None
    monkeypatch.setattr(owner, attr, classmethod(moved) if isinstance(raw, classmethod) else moved)


DRIFTS = [
    pytest.param(patch, how, id=f"{patch.name}-{how}")
    for patch in modelopt_patches.PATCHES
    for how in ("gone", "signature")
]


@pytest.mark.parametrize(("patch", "how"), DRIFTS)
def test_drifted_patch_target_is_a_one_line_refusal(
    patch, how, micro_bf16, tmp_path, capsys, monkeypatch, no_model_load
):
    drift(monkeypatch, patch, how)
    dst = tmp_path / "dst" / "export"
    refused(
        quantize(micro_bf16, dst),
        capsys,
        names=[f"{patch.target.module}.{patch.target.qualname}"],
        protected=[micro_bf16],
        absent=[dst.parent, *leftovers(dst)],
    )


# ---- the node's driver (--driver hf_ptq): refused before hf_ptq's main() runs ------------------------------


@pytest.fixture
def hf_ptq_repo(tmp_path, monkeypatch) -> Path:
    """A stand-in Model-Optimizer checkout; the case fails if hf_ptq's main() is reached."""
    from pipeline import hf_ptq
    from tests.quantize.test_hf_ptq_driver import make_repo

    def ran(*args, **kwargs):
        raise AssertionError("hf_ptq ran before the refusal")

    monkeypatch.setattr(hf_ptq, "run", ran)
    return make_repo(tmp_path / "modelopt", hf_ptq.load_contract())


def hf_ptq(src: Path, dst: Path, repo: Path, *extra: object) -> list[object]:
    return ["quantize", src, dst, "--driver", "hf_ptq", "--modelopt-repo", repo, "--calib-size", "8", *extra]


@pytest.mark.parametrize("how", ["gone", "signature"])
def test_drifted_patch_target_stops_the_hf_ptq_driver_too(
    how, micro_bf16, tmp_path, capsys, monkeypatch, hf_ptq_repo
):
    patch = modelopt_patches.PATCHES[0]
    drift(monkeypatch, patch, how)
    dst = tmp_path / "dst" / "export"
    refused(
        hf_ptq(micro_bf16, dst, hf_ptq_repo),
        capsys,
        names=[f"{patch.target.module}.{patch.target.qualname}"],
        protected=[micro_bf16, hf_ptq_repo],
        absent=[dst.parent, *leftovers(dst)],
    )


@pytest.mark.parametrize("kind", list(NOT_A_FOLDER))
def test_hf_ptq_driver_refuses_a_destination_that_is_not_a_folder(
    kind, micro_bf16, tmp_path, capsys, hf_ptq_repo
):
    dst = tmp_path / "dst" / "export"
    dst.parent.mkdir()
    NOT_A_FOLDER[kind](dst)
    refused(
        hf_ptq(micro_bf16, dst, hf_ptq_repo),
        capsys,
        names=[dst],
        protected=[micro_bf16, dst.parent, hf_ptq_repo],
        fifos=[dst] if kind == "fifo" else (),
    )


@pytest.mark.parametrize("where", ["notes", "release", "notes-overwrite", "inside-source"])
def test_hf_ptq_driver_refuses_a_destination_it_must_not_write(
    where, micro_bf16, micro_release, bf16_copy, tmp_path, capsys, hf_ptq_repo
):
    extra: tuple[str, ...] = ("--overwrite",) if where.endswith("-overwrite") else ()
    if where == "inside-source":
        src, dst = bf16_copy, bf16_copy / "nvfp4"
        protected = [bf16_copy]
    else:
        src, dst = micro_bf16, tmp_path / "dst" / "export"
        dst.parent.mkdir()
        FOREIGN[where.removesuffix("-overwrite")](dst, {"release": micro_release, "bf16": micro_bf16})
        protected = [micro_bf16, dst.parent]
    refused(
        hf_ptq(src, dst, hf_ptq_repo, *extra),
        capsys,
        names=[dst],
        protected=[*protected, hf_ptq_repo],
        absent=[dst] if where == "inside-source" else [],
    )


# ---- two runs into one DST ---------------------------------------------------------------------------

# argv: the dsv4 argv. Held once ModelOpt's export has written .DST.partial, before it is renamed to DST: the
# moment a second run's clean-up (rmtree of .DST.partial, of DST.calibration) would do the most harm.
HELD_QUANTIZE = textwrap.dedent(
    """
    import sys
    import modelopt.torch.export as export
    real = export.export_hf_checkpoint
    def held(*args, **kwargs):
        real(*args, **kwargs)
        print("READY", file=sys.__stdout__, flush=True)
        sys.stdin.readline()
    export.export_hf_checkpoint = held
    from pipeline.cli import main
    sys.argv = ["dsv4", *sys.argv[1:]]
    sys.exit(main())
    """
)


@pytest.mark.skipif(
    not Path("/proc/locks").exists(), reason="needs /proc/locks (Linux) to see who holds a flock"
)
def test_second_quantize_into_a_destination_being_written_is_refused(
    micro_bf16, tmp_path, capsys, monkeypatch
):
    dst = tmp_path / "dst" / "export"
    partial = dst.with_name(f".{dst.name}.partial")
    first = H.HeldRun(HELD_QUANTIZE, quantize(micro_bf16, dst), ROOT)
    try:
        first.wait_ready()
        first.freeze()  # whatever changes from here on is the second run's doing
        held = H.locks_held_by(first.pid, dst.parent)
        assert len(held) == 1, f"the first run holds {len(held)} lock(s) in {dst.parent}, not one"
        lock = held[0]
        assert partial.is_dir() and not dst.exists()
        exported = tree_digest(partial)
        protected = [micro_bf16, dst.parent]
        with monkeypatch.context() as m:
            m.setattr("pipeline.quantize.load_bf16_model", _loaded)
            for extra in ((), ("--overwrite",), ("--export-only",)):
                before = H.snapshot(*protected)
                outcome = H.run_dsv4_bounded(quantize(micro_bf16, dst, *extra), capsys, unstick=first.close)
                try:
                    H.assert_refused_as_held(
                        outcome, out=dst, pid=first.pid, before=before, protected=protected, lock=lock
                    )
                except AssertionError as err:
                    raise AssertionError(f"second run {extra}: {err}") from None
        first.thaw()
        rc, err = first.finish()
        assert rc == 0 and "Traceback" not in err, err[-4000:]
    finally:
        first.close()
    # its export, renamed into place with its report, as the second runs found it; its lock gone
    assert {k: v for k, v in tree_digest(dst).items() if k != REPORT_NAME} == exported
    assert (dst / REPORT_NAME).is_file() and not lock.exists() and not partial.exists()

    # a lock file left by a run killed with SIGKILL (no flock on it) does not stand in the next run's way
    lock.write_text(
        f'{{"pid": {first.pid}, "host": "here", "started": "then", "command": "dsv4 quantize"}}\n'
    )
    outcome = H.run_dsv4_bounded(quantize(micro_bf16, dst, "--overwrite"), capsys, unstick=lambda: None)
    assert outcome.rc == 0 and not outcome.raised and not outcome.hung, outcome.show()
    assert not lock.exists()


def _loaded(*args, **kwargs):
    raise AssertionError("dsv4 quantize loaded the model before refusing")
