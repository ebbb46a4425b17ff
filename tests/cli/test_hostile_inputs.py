"""The hostile-input suite (issue 13): every command that reads a checkpoint, on inputs a user trips over.

Each case takes a private copy of a tiny checkpoint, makes it hostile (harness/hostile.py), runs `dsv4` in
this process as a user would, and asserts the one contract (harness.hostile.assert_refused): exit 2, one
line ``dsv4: error: ...`` naming the file or key, no traceback, every input byte unchanged, no output
that looks complete. The classes follow the issue: --overwrite/--resume on folders and inputs they must
not trust, non-regular files, index entries outside the folder, bad values a user needs one line for,
and the silently wrong (a config that does not describe the tensors, NaN scales and weights outside
validation's sample, a key twice in one header). Two runs into one folder need two processes:
tests/cli/test_hostile_concurrent.py.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness import hostile as H
from pipeline.checkpoint import atomic
from pipeline.checkpoint.validate import validate_checkpoint

pytestmark = pytest.mark.slow  # 157 cases, ~9 s on 2 cores: kept out of the -m unit loop

# Validation reads a sample of the scale tensors (128 on the release, of about 100,000). The tiny
# checkpoints have about as many scales as the sample, so the cases shrink it to stand for a release
# that dwarfs it; the hostile value is then put where validation's own sample does not look.
SAMPLE = 8
# Small output shards, so that a killed run leaves finished shards behind (the tiny outputs are a few MB).
SMALL_SHARD_GIB = "0.0005"


# ---- the commands, as data -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    reads: str  # the kind of checkpoint it reads: release, export, converted
    argv: tuple[str, ...]  # {in}: the hostile input, {out}: an output folder, {export}: a clean export
    writes: bool = False  # has an output folder
    checker: bool = False  # dsv4 validate: exit 1 with a problem line is its documented refusal


STREAM = ("--quiet",)
COMMANDS: dict[str, Command] = {
    "validate": Command("release", ("validate", "{in}"), checker=True),
    "inspect": Command("release", ("inspect", "{in}")),
    "dequant": Command("release", ("dequant", "{in}", "{out}", "--device", "cpu", *STREAM), writes=True),
    "slice": Command(
        "release", ("slice", "{in}", "{out}", "--layers", "2", "--experts", "2", *STREAM), writes=True
    ),
    "transcode-scan": Command("release", ("transcode-scan", "{in}")),
    "convert-graft": Command(
        "release",
        ("convert", "{export}", "{out}", "--graft-from", "{in}", "--device", "cpu", *STREAM),
        writes=True,
    ),
    "validate-export": Command("export", ("validate", "{in}"), checker=True),
    "convert": Command("export", ("convert", "{in}", "{out}", "--device", "cpu", *STREAM), writes=True),
    "use-plugin": Command("export", ("use-plugin", "{in}")),
    "fix-config": Command("converted", ("fix-config", "{in}")),
    "serve-print": Command("converted", ("serve", "{in}", "--print", "--tensor-parallel-size", "1")),
}
RELEASE_READERS = ("validate", "inspect", "dequant", "slice", "transcode-scan", "convert-graft")
HEADER_READERS = (*RELEASE_READERS, "convert", "use-plugin", "serve-print")
WRITERS = ("dequant", "convert", "slice")


@dataclass
class Case:
    """One run: the command, its hostile input, the output folder, and the clean side input."""

    name: str
    inp: Path
    out: Path
    export: Path

    @property
    def command(self) -> Command:
        return COMMANDS[self.name]

    def argv(self, *extra: str) -> list[str]:
        fill = {"{in}": str(self.inp), "{out}": str(self.out), "{export}": str(self.export)}
        return [fill.get(a, a) for a in self.command.argv] + list(extra)

    @property
    def protected(self) -> list[Path]:
        return [self.inp.parent, self.export]

    @property
    def outputs(self) -> list[Path]:
        return [self.out] if self.command.writes else []


@pytest.fixture
def masters(request):
    """kind -> the session's master checkpoint of that kind (built on first use; never mutated)."""

    def get(kind: str) -> Path:
        if kind == "release":
            return request.getfixturevalue("_tiny_release_master")
        if kind == "bf16":
            return request.getfixturevalue("_tiny_bf16_master")
        if kind == "export":
            return request.getfixturevalue("exports")("experts", "X")
        if kind == "converted":
            return request.getfixturevalue("converted")("experts", "X", "shared", True).out_dir
        raise ValueError(kind)

    return get


@pytest.fixture
def case(masters, tmp_path):
    """name -> a Case with a fresh copy of the input that command reads, under tmp_path/in/."""

    def make(name: str) -> Case:
        kind = COMMANDS[name].reads
        inp = H.copy_tree(masters(kind), tmp_path / "in" / kind)
        if kind == "converted":
            (inp / "tokenizer.json").write_text("{}")  # serve needs a tokenizer; the content is not read
        return Case(name, inp, tmp_path / "out", masters("export"))

    return make


def refused(c: Case, capsys, *, names, extra=(), fifos=(), outputs=None) -> None:
    """Run the case's command (the input already made hostile) and assert the contract."""
    before = H.snapshot(*c.protected)
    outcome = H.run_dsv4(c.argv(*extra), capsys, fifos=fifos)
    H.assert_refused(
        outcome,
        names=names,
        before=before,
        protected=c.protected,
        outputs=c.outputs if outputs is None else outputs,
        checker=c.command.checker,
    )


def shrink_validation_sample(monkeypatch) -> None:
    defaults = validate_checkpoint.__kwdefaults__ or {}
    if "sample_size" in defaults:
        monkeypatch.setitem(defaults, "sample_size", SAMPLE)


_UNSAMPLED: dict[tuple[str, str], str] = {}


def unsampled_key(master: Path, pattern: str, scratch: Path) -> str:
    """A key matching ``pattern`` whose NaN validation (with the shrunk sample) does not report; the
    first match if it reports them all (then validation itself must refuse it, which is as good)."""
    cache_key = (str(master), pattern)
    if cache_key not in _UNSAMPLED:
        copy = H.copy_tree(master, scratch / "oracle")
        keys = H.keys_matching(copy, pattern)
        for key in keys:
            H.set_element(copy, key, float("nan"))
        flagged = {p.key for p in validate_checkpoint(copy, sample_size=SAMPLE).problems}
        _UNSAMPLED[cache_key] = next((k for k in keys if k not in flagged), keys[0])
    return _UNSAMPLED[cache_key]


# ---- class 4: a shard, index or config that is a FIFO or a folder ------------------------------------

TARGETS = {
    "release": ("shard", "index", "config"),
    "export": ("shard", "config", "hf_quant_config"),
    "converted": ("shard", "index", "config", "hf_quant_config"),
}
NOT_READ = {  # (command, file) it does not read
    ("fix-config", "shard"),  # the index gives it the key names
    ("validate-export", "hf_quant_config"),  # validate checks tensors against config.json only
}
NON_REGULAR_CASES = [
    pytest.param(name, target, kind, id=f"{name}-{target}-{kind}")
    for name, cmd in COMMANDS.items()
    for target in TARGETS[cmd.reads]
    if (name, target) not in NOT_READ
    for kind in H.NON_REGULAR
]


@pytest.mark.parametrize(("name", "target", "kind"), NON_REGULAR_CASES)
def test_non_regular_input_file_is_refused_without_hanging(name, target, kind, case, capsys):
    c = case(name)
    path = H.NON_REGULAR[kind](H.target_file(c.inp, target))
    refused(c, capsys, names=[path.name], fifos=[path] if kind == "fifo" else ())


# ---- class 5: index entries outside the checkpoint folder ----------------------------------------------

INDEXED = (*RELEASE_READERS, "convert", "use-plugin", "fix-config", "serve-print")
ESCAPE_CASES = [pytest.param(name, esc, id=f"{name}-{esc}") for name in INDEXED for esc in H.ESCAPES]


@pytest.mark.parametrize(("name", "escape"), ESCAPE_CASES)
def test_weight_map_entry_outside_the_folder_is_refused(name, escape, case, capsys):
    """vLLM reads shards from the checkpoint folder itself: an entry that leaves it (or goes into a
    subfolder) is a checkpoint vLLM cannot load, however well the step could read it."""
    c = case(name)
    if not (c.inp / H.INDEX).exists():
        H.add_index(c.inp)  # a sharded export has one
    entry, keys = H.move_shard_out(c.inp, escape)
    refused(c, capsys, names=[entry, *keys])


# ---- class 7: a key twice in one header -----------------------------------------------------------------


@pytest.mark.parametrize("name", HEADER_READERS)
def test_key_twice_in_one_header_is_refused_naming_it(name, case, capsys):
    """A JSON parser keeps the last of two equal keys: the header must be refused, naming the key."""
    c = case(name)
    key = H.duplicate_first_key(H.shard_files(c.inp)[0])
    refused(c, capsys, names=[key])


# ---- classes 6 and 7: values validation's sample does not see -------------------------------------------

W13_SCALE_2 = r"experts\.\d+\.w[13]\.weight_scale_2$"
ATTN_SCALE = r"^layers\.0\.attn\.w\w+\.scale$"  # FP8 block scales (UE8M0)
EXPERT_SCALE = r"^layers\.0\.ffn\.experts\.\d+\.w\d\.scale$"  # MXFP4 block scales (UE8M0)
# id -> (command, key pattern, value): where each command reads the value and would pass it on
BAD_VALUES = {
    **{f"convert-w13-weight_scale_2-{v}": ("convert", W13_SCALE_2, v) for v in ("nan", "0", "inf", "-1")},
    "convert-w2-weight_scale_2-nan": ("convert", r"experts\.\d+\.w2\.weight_scale_2$", "nan"),
    "convert-input_scale-nan": ("convert", r"experts\.\d+\.w[123]\.input_scale$", "nan"),
    "dequant-fp8-scale-nan": ("dequant", ATTN_SCALE, "nan"),
    "dequant-mxfp4-scale-nan": ("dequant", EXPERT_SCALE, "nan"),
    "slice-fp8-scale-nan": ("slice", ATTN_SCALE, "nan"),
    "convert-graft-fp8-scale-nan": ("convert-graft", ATTN_SCALE, "nan"),
    "transcode-scan-mxfp4-scale-nan": ("transcode-scan", EXPERT_SCALE, "nan"),
}


@pytest.mark.parametrize(("name", "pattern", "value"), list(BAD_VALUES.values()), ids=list(BAD_VALUES))
def test_bad_scale_outside_the_validation_sample_is_refused(
    name, pattern, value, case, masters, tmp_path, capsys, monkeypatch
):
    """A zero, negative, infinite or NaN scale the step reads is refused, naming its key, wherever it is:
    not only where validation's sample happens to look."""
    shrink_validation_sample(monkeypatch)
    c = case(name)
    key = unsampled_key(masters(c.command.reads), pattern, tmp_path)
    H.set_element(c.inp, key, float(value))
    refused(c, capsys, names=[key])


# (command, key pattern): an FP8 (release) or BF16 (export) weight with a NaN in it
NAN_WEIGHTS = [
    ("dequant", r"^layers\.0\.attn\.wq_a\.weight$"),
    ("slice", r"^layers\.0\.attn\.wq_a\.weight$"),
    ("convert-graft", r"^layers\.0\.attn\.wq_a\.weight$"),
    ("convert", r"layers\.0\.attn\.wq_a\.weight$"),
]


@pytest.mark.parametrize(("name", "pattern"), NAN_WEIGHTS, ids=[n for n, _ in NAN_WEIGHTS])
def test_nan_weight_is_refused_naming_it(name, pattern, case, capsys):
    """A NaN weight element dequantizes, quantizes and is copied as NaN: the step must refuse it."""
    c = case(name)
    (key,) = H.keys_matching(c.inp, pattern)
    H.set_element(c.inp, key, float("nan"), element=3)
    refused(c, capsys, names=[key])


# ---- class 7: a quantization_config that does not describe the tensors ---------------------------------

QUANT_CONFIGS = [
    ("validate", "bitsandbytes"),
    ("validate", None),
    ("slice", "bitsandbytes"),
    ("slice", None),
    ("dequant", "bitsandbytes"),
    ("convert-graft", "bitsandbytes"),
    ("transcode-scan", "bitsandbytes"),
    ("validate-export", "bitsandbytes"),
    ("convert", "bitsandbytes"),
    ("use-plugin", "bitsandbytes"),
    ("serve-print", "bitsandbytes"),
]


@pytest.mark.parametrize(
    ("name", "method"), QUANT_CONFIGS, ids=[f"{n}-{m or 'absent'}" for n, m in QUANT_CONFIGS]
)
def test_quantization_config_that_does_not_describe_the_tensors_is_refused(name, method, case, capsys):
    """FP8/MXFP4 (or NVFP4) tensors under a config that says another method, or none: a loader would
    build the wrong layers. Validation must flag it; no step may copy it on."""
    c = case(name)
    H.set_quant_method(c.inp, method)
    refused(c, capsys, names=["quantization_config", "quant_method", H.CONFIG])


# ---- class 1: --overwrite (and --resume) on a folder no dsv4 run wrote ---------------------------------


def user_folder(path: Path) -> Path:
    """A folder of someone's own files, safetensors among them."""
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("my notes\n")
    (path / "weights.safetensors").write_bytes(b"\x08" + b"\0" * 7 + b"{}      ")
    return path


FOREIGN_DST = {
    "release": lambda masters, where: H.copy_tree(masters("release"), where),
    "user-files": lambda masters, where: user_folder(where),
}
OVERWRITE_CASES = [
    pytest.param(name, dst, flag, id=f"{name}-{dst}{flag}")
    for name in WRITERS
    for dst in FOREIGN_DST
    for flag in ("--overwrite", "--resume")
]


@pytest.mark.parametrize(("name", "dst", "flag"), OVERWRITE_CASES)
def test_overwrite_of_a_folder_no_dsv4_run_wrote_is_refused(name, dst, flag, case, masters, tmp_path, capsys):
    """`dsv4 convert EXPORT RELEASE --overwrite` (a slip for --graft-from RELEASE) deleted the release."""
    c = case(name)
    c.out = FOREIGN_DST[dst](masters, tmp_path / "theirs")
    before = H.snapshot(*c.protected, c.out)
    outcome = H.run_dsv4(c.argv(flag), capsys)
    H.assert_refused(
        outcome, names=[str(c.out)], before=before, protected=[*c.protected, c.out], checker=False
    )


# ---- class 2: --resume after the input changed (same headers, size and mtime; other bytes) -------------


def kill_after_first_shard(monkeypatch, out: Path) -> None:
    """The writer raises KeyboardInterrupt (Ctrl-C) as it starts a second shard: a killed run."""
    real = atomic._write_all

    def write(fd, data):
        target = os.readlink(f"/proc/self/fd/{fd}")
        if target.endswith(".safetensors.partial") and any(out.glob("*.safetensors")):
            raise KeyboardInterrupt
        return real(fd, data)

    monkeypatch.setattr(atomic, "_write_all", write)


RESUME_CASES = {  # command -> a tensor it reads (changed between the killed run and --resume)
    "dequant": r"^layers\.0\.attn_norm\.weight$",
    "slice": r"^layers\.0\.attn_norm\.weight$",
    "convert": r"layers\.0\.ffn\.experts\.0\.w1\.weight$",
    "convert-graft": r"^layers\.0\.attn_norm\.weight$",
}


@pytest.mark.parametrize("name", RESUME_CASES)
def test_resume_after_the_input_changed_is_refused(name, case, capsys, monkeypatch):
    """The journal must bind to the input's content: a resumed run would keep shards made from other bytes."""
    c = case(name)
    with monkeypatch.context() as m:
        kill_after_first_shard(m, c.out)
        killed = H.run_dsv4(c.argv("--max-shard-gib", SMALL_SHARD_GIB), capsys)
    finished = sorted(p.name for p in c.out.glob("*.safetensors"))
    assert finished and H.looks_complete(c.out) is None, "could not simulate a killed run:\n" + killed.show()
    (key,) = H.keys_matching(c.inp, RESUME_CASES[name])
    changed = H.flip_low_bit(c.inp, key)
    resume = ("--max-shard-gib", SMALL_SHARD_GIB, "--resume")
    refused(c, capsys, names=[str(c.inp), changed.file.name], extra=resume)


# ---- class 6: where the output goes -----------------------------------------------------------------------

RO_CASES = [
    pytest.param(name, exists, id=f"{name}-{exists}") for name in WRITERS for exists in ("new", "empty")
]


@pytest.mark.parametrize(("name", "exists"), RO_CASES)
def test_read_only_output_file_system_is_one_line(name, exists, case, tmp_path, capsys):
    c = case(name)
    mount = tmp_path / "ro-mount"
    mount.mkdir()
    c.out = mount / "out"
    if exists == "empty":
        c.out.mkdir()
    before = H.snapshot(*c.protected)
    with H.read_only(mount):
        outcome = H.run_dsv4(c.argv(), capsys)
    H.assert_refused(outcome, names=[str(c.out)], before=before, protected=c.protected, outputs=[c.out])


@pytest.mark.parametrize("name", WRITERS)
def test_output_path_that_is_a_file_is_refused(name, case, tmp_path, capsys):
    c = case(name)
    c.out = tmp_path / "notes.txt"
    c.out.write_text("mine\n")
    before = H.snapshot(*c.protected, c.out)
    outcome = H.run_dsv4(c.argv(), capsys)
    H.assert_refused(outcome, names=[str(c.out)], before=before, protected=[*c.protected, c.out])


def test_quantize_without_modelopt_is_one_line(masters, tmp_path, capsys, monkeypatch):
    """The base install has no ModelOpt: `dsv4 quantize` says what to install, in one line."""
    monkeypatch.setitem(sys.modules, "modelopt", None)  # find_spec answers None, import fails
    src = H.copy_tree(masters("bf16"), tmp_path / "in" / "bf16")
    before = H.snapshot(src.parent)
    outcome = H.run_dsv4(["quantize", src, tmp_path / "out", "--device", "cpu"], capsys)
    H.assert_refused(
        outcome, names=["modelopt"], before=before, protected=[src.parent], outputs=[tmp_path / "out"]
    )
