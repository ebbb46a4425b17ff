"""Reading sharded safetensors checkpoints: headers parsed by hand, tensors read one at a time.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
(``{"__metadata__": {...}, key: {"dtype", "shape", "data_offsets": [begin, end]}}``, offsets relative
to the end of the header), then the data. Header-only inspection reads just 8 + N bytes per shard, so
the 64 shards of the 805 GiB release open in well under a second.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.errors import DsV4Error

from . import dtypes

INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
# A header larger than this is corrupt, not big: the release's largest is well under 1 MB.
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(slots=True)
class TensorInfo:
    """One tensor as a shard header describes it; ``begin``/``end`` are absolute file offsets."""

    key: str
    dtype: str  # safetensors string
    shape: tuple[int, ...]
    file: Path
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtypes.to_torch(self.dtype)


@dataclass
class ShardHeader:
    path: Path
    header_len: int
    file_size: int
    metadata: dict[str, str] | None
    tensors: dict[str, TensorInfo]  # in header order

    @property
    def data_start(self) -> int:
        return 8 + self.header_len

    @property
    def data_bytes(self) -> int:
        return self.file_size - self.data_start


# What a non-regular file is, for the message that refuses it (stat's S_IS* predicates, in order).
_FILE_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe): reading it would wait forever for a writer"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def regular_file_size(path: str | os.PathLike, what: str = "file") -> int:
    """The size of ``path`` if it is a regular file (after following symlinks); DsV4Error otherwise.

    Every checkpoint file the pipeline opens for reading (shards, the index, config.json and its JSON
    siblings) is checked here first: opening a FIFO blocks until something writes to it, so a shard that
    is one would hang every command. os.stat does not open the file, so it cannot block.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DsV4Error(f"{path}: no such file") from None
    except OSError as err:
        raise DsV4Error(f"{path}: cannot read: {err.strerror or err}") from err
    if not stat.S_ISREG(st.st_mode):
        kind = next((text for test, text in _FILE_KINDS if test(st.st_mode)), "not a regular file")
        raise DsV4Error(f"{path}: the {what} is {kind}; replace it with a regular file")
    return st.st_size


def shard_name_problem(name: str) -> str | None:
    """Why an index's weight_map value cannot name a shard, or None if it is a plain file name.

    vLLM loads the ``*.safetensors`` files of the checkpoint's top folder, so a shard must be a file
    name there: no absolute path, no ``..``, no subfolder. Anything else is refused before it is opened
    (a ``../elsewhere/x.safetensors`` would read, and vouch for, a file outside the checkpoint).
    A symlink with a plain name is followed: a checkpoint may be a folder of links into a Hugging Face
    cache (``snapshots/<rev>/x.safetensors -> ../../blobs/<hash>``), which vLLM reads the same way;
    :func:`regular_file_size` still requires the link's target to be a regular file.
    """
    if not name or name in (".", ".."):
        return f"names {name!r}, which is not a file name"
    if os.path.isabs(name) or name.startswith(("/", "\\")):
        return f"names the absolute path {name!r}, outside the checkpoint folder"
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        return f"names {name!r}, outside the checkpoint folder"
    if len(parts) > 1:
        return (
            f"names {name!r}, in a subfolder: vLLM only looks at the checkpoint's top folder; "
            "put the shard there and name it by its file name"
        )
    return None


def read_header(path: str | os.PathLike) -> ShardHeader:
    """Parse one shard's header and check it against the file size; DsV4Error naming the file (and key)."""
    path = Path(path)
    size = regular_file_size(path, "shard")
    try:
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise DsV4Error(f"{path}: {size} bytes, too short for a safetensors header length (8 bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise DsV4Error(
                    f"{path}: header length {n} does not fit the file of {size} bytes "
                    "(truncated, or not safetensors)"
                )
            raw = f.read(n)
    except OSError as err:
        raise DsV4Error(f"{path}: cannot read: {err.strerror or err}") from err
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DsV4Error(f"{path}: corrupt header JSON: {err}") from None
    if not isinstance(header, dict):
        raise DsV4Error(f"{path}: header JSON is a {type(header).__name__}, expected an object")
    if _may_repeat_a_key(raw, header):
        _raise_on_duplicate_keys(path, raw)
    return _parse_header(path, n, size, header)


_ENTRY_FIELDS = (b'"dtype"', b'"shape"', b'"data_offsets"')


def _may_repeat_a_key(raw: bytes, header: dict) -> bool:
    """Whether the header text may hold a key twice, which json.loads hides by keeping the last one.

    Each tensor entry spells each field name once, so a key written twice shows as more field names in
    the text than entries in the parsed dict. Counting bytes costs ~1 % of the parse; parsing with an
    object_pairs_hook on every header would cost ~50 % more (a 2 MB header: 20 ms -> 30 ms). A key or a
    metadata value that happens to spell a field name only costs the slow check, which finds nothing.
    """
    entries = len(header) - ("__metadata__" in header)
    return raw.count(b'"__metadata__"') > 1 or any(raw.count(f) != entries for f in _ENTRY_FIELDS)


def _raise_on_duplicate_keys(path: Path, raw: bytes) -> None:
    """Parse again, keeping every pair, and name the first key written twice in any object."""

    def pairs_hook(pairs: list[tuple[str, object]]) -> dict:
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DsV4Error(
                    f"{path}: key {key} appears twice in the header (readers keep one of the two "
                    "silently); re-export the shard"
                )
            seen.add(key)
        return dict(pairs)

    json.loads(raw.decode("utf-8"), object_pairs_hook=pairs_hook)


def _parse_header(path: Path, n: int, size: int, header: dict) -> ShardHeader:
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not isinstance(metadata, dict):
        raise DsV4Error(f"{path}: __metadata__ must be an object")
    data_start = 8 + n
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    by_name = dtypes.BY_NAME
    for key, entry in header.items():
        # The fast path checks everything; any failure takes the slow path, which says what is wrong.
        try:
            dt = by_name[entry["dtype"]]
            shape, (b, e) = entry["shape"], entry["data_offsets"]
            numel = 1
            for d in shape:
                if type(d) is not int or d < 0:
                    raise ValueError
                numel *= d
            if type(b) is not int or type(e) is not int or not 0 <= b <= e or e - b != numel * dt.itemsize:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            _entry_error(path, key, entry)
        tensors[key] = TensorInfo(key, dt.name, tuple(shape), path, data_start + b, data_start + e)
        spans.append((b, e, key))
    # The data region must be covered exactly, without gaps or overlaps, and end at the end of the file.
    spans.sort()
    pos = 0
    for b, e, key in spans:
        if b != pos:
            what = "overlaps the previous tensor" if b < pos else "leaves a gap before it"
            raise DsV4Error(f"{path}: key {key}: data_offsets {what}")
        pos = e
    if data_start + pos > size:
        last = spans[-1][2]
        raise DsV4Error(
            f"{path}: truncated: the header needs {data_start + pos} bytes but the file has {size} "
            f"(key {last} ends past the end of the file)"
        )
    if data_start + pos < size:
        raise DsV4Error(
            f"{path}: {size - data_start - pos} bytes after the last tensor's data "
            f"(file size {size}, expected {data_start + pos})"
        )
    return ShardHeader(path, n, size, metadata, tensors)


def _entry_error(path: Path, key: str, entry: object) -> None:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise DsV4Error(f"{path}: key {key}: header entry needs dtype, shape and data_offsets; got {entry!r}")
    dt = dtypes.lookup(entry["dtype"], where=f"{path}: key {key}")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise DsV4Error(f"{path}: key {key}: bad shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)) or not (
        0 <= offsets[0] <= offsets[1]
    ):
        raise DsV4Error(f"{path}: key {key}: bad data_offsets {offsets!r}")
    expected = math.prod(shape) * dt.itemsize
    raise DsV4Error(
        f"{path}: key {key}: data_offsets {offsets} span {offsets[1] - offsets[0]} bytes but "
        f"{dt.name} {shape} needs {expected}"
    )


def read_json_object(path: str | os.PathLike) -> dict:
    """A JSON object from a file; DsV4Error naming the file when it is unreadable, not JSON, or not an
    object. Every JSON file the pipeline reads (index, config, hf_quant_config) goes through here."""
    path = Path(path)
    regular_file_size(path, f"{path.name} file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise DsV4Error(f"{path}: cannot read: {err.strerror or err}") from err
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DsV4Error(f"{path}: cannot parse JSON: {err}") from None
    if not isinstance(data, dict):
        raise DsV4Error(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_index(path: str | os.PathLike) -> dict[str, str]:
    """The weight_map of a ``model.safetensors.index.json``: key -> shard file name."""
    path = Path(path)
    data = read_json_object(path)
    wm = data.get("weight_map")
    if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
        raise DsV4Error(f"{path}: no weight_map object mapping keys to shard file names")
    bad = {name: why for name in set(wm.values()) if (why := shard_name_problem(name))}
    if bad:
        key, name = min((k, v) for k, v in wm.items() if v in bad)
        others = f" ({len(bad) - 1} more such shard name(s))" if len(bad) > 1 else ""
        raise DsV4Error(f"{path}: key {key}: weight_map {bad[name]}{others}")
    return wm


def read_tensor(info: TensorInfo, f=None) -> torch.Tensor:
    """Read one tensor's bytes (seek + read of its range) as a torch tensor of its dtype and shape.

    ``f``: an already open binary file of ``info.file``, to read many tensors of one shard cheaply.
    """
    try:
        if f is None:
            with info.file.open("rb") as g:
                return read_tensor(info, g)
        f.seek(info.begin)
        # read straight into the tensor's own memory: torch.empty is not zero-filled first, as a
        # bytearray would be (a whole pass over the bytes, ~15 % of reading a tensor from the page cache)
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        got = f.readinto(memoryview(buf.numpy())) if info.nbytes else 0
    except OSError as err:
        raise DsV4Error(f"{info.file}: key {info.key}: cannot read: {err.strerror or err}") from err
    if got != info.nbytes:
        raise DsV4Error(f"{info.file}: key {info.key}: truncated: read {got} of {info.nbytes} bytes")
    if not info.nbytes:
        return torch.empty(info.shape, dtype=info.torch_dtype)
    return buf.view(info.torch_dtype).reshape(info.shape)


@dataclass
class Checkpoint:
    """A checkpoint opened from its headers: where it is, which shards, and every tensor's TensorInfo.

    Open with :meth:`open`; read tensors with :meth:`read` or :meth:`iter_tensors` (one at a time).
    """

    root: Path  # the directory (for a single file, its parent)
    index_path: Path | None
    shards: dict[str, ShardHeader]  # file name -> header, in shard order
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    config: dict | None = None

    @classmethod
    def open(cls, path: str | os.PathLike) -> Checkpoint:
        """Open a directory (by its index if it has one, else its ``*.safetensors``), an index file,
        or a single ``.safetensors`` file. Raises DsV4Error on any inconsistency between the index
        and the shards; :func:`pipeline.checkpoint.validate.validate_checkpoint` reports them all.
        """
        root, index_path, shard_paths, weight_map = locate_with_index(path)
        shards = {p.name: read_header(p) for p in shard_paths}
        tensors: dict[str, TensorInfo] = {}
        for sh in shards.values():
            for key, info in sh.tensors.items():
                if key in tensors:
                    raise DsV4Error(f"{sh.path}: key {key} is also in {tensors[key].file.name}")
                tensors[key] = info
        if weight_map is not None:
            for key, name in weight_map.items():
                if key not in tensors or tensors[key].file.name != name:
                    raise DsV4Error(
                        f"{index_path}: key {key}: the index names {name}, which does not hold it"
                    )
            extra = sorted(tensors.keys() - weight_map.keys())
            if extra:
                raise DsV4Error(f"{tensors[extra[0]].file}: key {extra[0]} is not in {index_path.name}")
        return cls(root, index_path, shards, tensors, read_config(root))

    def read(self, key: str) -> torch.Tensor:
        try:
            info = self.tensors[key]
        except KeyError:
            raise DsV4Error(f"{self.root}: no tensor {key}") from None
        return read_tensor(info)

    def iter_tensors(self, keys: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (key, tensor) one at a time, shard by shard in file order, keeping one shard open."""
        wanted = set(self.tensors) if keys is None else set(keys)
        for sh in self.shards.values():
            infos = sorted((i for k, i in sh.tensors.items() if k in wanted), key=lambda i: i.begin)
            if not infos:
                continue
            with sh.path.open("rb") as f:
                for info in infos:
                    yield info.key, read_tensor(info, f)

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self.tensors.values())


def locate(path: str | os.PathLike) -> tuple[Path, Path | None, list[Path]]:
    """(root dir, index path or None, shard paths) for a directory, an index file or a .safetensors file.

    With an index, the shards are the distinct files it names (in sorted order), whether or not they
    exist (a missing one fails when read); without, the directory's ``*.safetensors`` files.
    """
    root, index_path, shards, _ = locate_with_index(path)
    return root, index_path, shards


def locate_with_index(path: str | os.PathLike) -> tuple[Path, Path | None, list[Path], dict[str, str] | None]:
    """:func:`locate`, plus the index's weight_map (None without an index), reading the index once."""
    p = Path(path)
    if not p.exists():
        raise DsV4Error(f"{p}: no such file or directory")
    if not p.is_dir():
        regular_file_size(p, "checkpoint file")
    if p.is_file() and p.name.endswith(".safetensors"):
        return p.parent, None, [p], None
    idx = p if p.is_file() and p.name.endswith(".json") else p / INDEX_NAME if p.is_dir() else None
    if idx is not None and idx.exists():
        wm = read_index(idx)
        return idx.parent, idx, [idx.parent / n for n in sorted(set(wm.values()))], wm
    if p.is_dir():
        files = sorted(p.glob("*.safetensors"))
        if not files:
            raise DsV4Error(f"{p}: no {INDEX_NAME} and no *.safetensors files")
        for q in files:  # a FIFO or folder named like a shard is refused, not skipped
            regular_file_size(q, "shard")
        return p, None, files, None
    raise DsV4Error(f"{p}: expected a checkpoint directory, an index .json or a .safetensors file")


def read_config(root: Path) -> dict | None:
    """config.json of a checkpoint directory, or None if it has none; DsV4Error if it is corrupt."""
    path = Path(root) / CONFIG_NAME
    return read_json_object(path) if os.path.lexists(path) else None
