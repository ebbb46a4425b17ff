"""The work folder beside AMAX that makes `dsv4 calibrate` resumable: ``.AMAX.work/``.

    manifest.json            what the run calibrates: the release's fingerprint, the options, the
                             calibration tokens' sha256, the versions (a resume must match it)
    layer-0000.safetensors   layer 0's amax (full ModelOpt names, 0-d float32) and, in the header
                             metadata, its fallbacks: the commit of layer 0
    hidden-0001.safetensors  layer 1's input hidden states, one tensor per batch, bit for bit

Commit order for layer i: ``hidden-{i+1}`` is written (temp name + rename) before ``layer-{i}``, and
``hidden-{i}`` is removed after. So a run killed anywhere finds, for its first layer without a
``layer-`` file, that layer's inputs on disk (layer 0's are recaptured from the embedding), and the
layers it keeps are exactly those whose files were complete. The final AMAX is merged from the layer
files whether or not the run was interrupted, so both give the same bytes.

Only torch and safetensors here (no ModelOpt, no transformers): the unit tier tests it.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.checkpoint import write_bytes_atomic, write_json_atomic
from pipeline.errors import DsV4Error

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
WORK_SUFFIX = ".work"
_LAYER_FILE = re.compile(r"layer-(\d{4})\.safetensors")
_HIDDEN_FILE = re.compile(r"hidden-(\d{4})\.safetensors")


def work_dir_for(amax: Path) -> Path:
    return amax.with_name(f".{amax.name}{WORK_SUFFIX}")


def _layer_name(i: int) -> str:
    return f"layer-{i:04d}.safetensors"


def _hidden_name(i: int) -> str:
    return f"hidden-{i:04d}.safetensors"


def manifest_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'where: was X, now Y' for every leaf that differs between two manifests (lists of input files are
    compared by path, so one changed shard is named, not the whole list)."""
    out: list[str] = []
    for key in sorted(old.keys() | new.keys(), key=str):
        a, b = old.get(key), new.get(key)
        where = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += manifest_differences(a, b, f"{where}.")
        elif (
            isinstance(a, list)
            and isinstance(b, list)
            and all(isinstance(r, dict) and "path" in r for r in a + b)
        ):
            out += manifest_differences({r["path"]: r for r in a}, {r["path"]: r for r in b}, f"{where}: ")
        elif a != b:
            if a is None or b is None:
                out.append(f"{where}: {'is new' if a is None else 'is gone'}")
            else:
                out.append(f"{where}: was {a!r}, now {b!r}")
    return out


@dataclass
class WorkDir:
    path: Path

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def open(self, manifest: dict, *, restart: bool = False) -> int:
        """Start or resume: the number of layers already committed (the first layer to run). A work
        folder from a run with another manifest is refused unless ``restart`` (then it is emptied)."""
        if self.path.exists() and not self.path.is_dir():
            raise DsV4Error(f"{self.path}: exists and is not a directory (dsv4 calibrate's work folder)")
        if self.path.is_dir() and restart:
            self._remove_ours()
        if self.path.is_dir() and any(self.path.iterdir()):
            old = self._read_manifest()
            changes = manifest_differences(old, manifest)
            if changes:
                more = f" (and {len(changes) - 1} more)" if len(changes) > 1 else ""
                raise DsV4Error(
                    f"{self.manifest_path}: an interrupted run of other inputs or options left this work "
                    f"folder ({changes[0]}{more}); rerun with the same ones to resume it, or pass --restart "
                    "to discard it"
                )
            return self.committed()
        self.path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.manifest_path, manifest)
        return 0

    def _read_manifest(self) -> dict:
        try:
            data = json.loads(self.manifest_path.read_text())
        except FileNotFoundError:
            raise DsV4Error(
                f"{self.path}: not empty and has no {MANIFEST}: not a work folder dsv4 calibrate wrote; move it "
                "away (or pass --restart to discard what dsv4 calibrate wrote there)"
            ) from None
        except (OSError, ValueError) as err:
            raise DsV4Error(
                f"{self.manifest_path}: unreadable ({err}); pass --restart to discard it"
            ) from None
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
            raise DsV4Error(
                f"{self.manifest_path}: key format: {data.get('format') if isinstance(data, dict) else data!r} is "
                f"not {MANIFEST_FORMAT}; written by another dsv4 version: pass --restart"
            )
        return data

    def _remove_ours(self) -> None:
        """--restart: remove the files this module writes; anything else there stops it."""
        names = [p.name for p in self.path.iterdir()]
        foreign = [
            n
            for n in names
            if n != MANIFEST
            and not _LAYER_FILE.fullmatch(n)
            and not _HIDDEN_FILE.fullmatch(n)
            and not n.startswith(".")
        ]
        if foreign:
            raise DsV4Error(
                f"{self.path}: holds {foreign[0]}, which dsv4 calibrate did not write; refusing to empty it"
            )
        shutil.rmtree(self.path)

    def committed(self) -> int:
        """How many layers, 0..k-1, have their amax file; a gap (layer k+1 without k) is damage."""
        found = sorted(int(m[1]) for p in self.path.iterdir() if (m := _LAYER_FILE.fullmatch(p.name)))
        if found != list(range(len(found))):
            gap = next(i for i, n in enumerate(found) if i != n)
            raise DsV4Error(
                f"{self.path / _layer_name(found[gap])}: layer {gap} has no amax file before it; the work folder "
                "is damaged: pass --restart"
            )
        return len(found)

    def commit_layer(
        self,
        index: int,
        amax: dict[str, torch.Tensor],
        metadata: dict,
        next_hidden: list[torch.Tensor] | None,
    ) -> None:
        """Record layer ``index``: the next layer's inputs first, then its amax (the commit), then drop its
        own inputs. ``next_hidden`` None: the last layer (no one reads its outputs)."""
        from safetensors.torch import save

        if next_hidden is not None:
            tensors = {f"batch.{j:05d}": h.detach().to("cpu").contiguous() for j, h in enumerate(next_hidden)}
            write_bytes_atomic(self.path / _hidden_name(index + 1), save(tensors))
        # one metadata key: safetensors stores metadata in a hash map, several keys come out in any order
        meta = {"dsv4_calibrate_layer": json.dumps(metadata, sort_keys=True)}
        ordered = {k: amax[k] for k in sorted(amax)}
        write_bytes_atomic(self.path / _layer_name(index), save(ordered, metadata=meta))
        (self.path / _hidden_name(index)).unlink(missing_ok=True)

    def hidden(self, index: int, device: torch.device) -> list[torch.Tensor]:
        """Layer ``index``'s input hidden states, as the previous layer produced them."""
        from safetensors.torch import load_file

        path = self.path / _hidden_name(index)
        if not path.is_file():
            raise DsV4Error(
                f"{path}: missing: layer {index - 1} is committed but its outputs are not here; the work folder "
                "is damaged: pass --restart"
            )
        loaded = load_file(path)
        return [loaded[k].to(device) for k in sorted(loaded)]

    def layer(self, index: int) -> tuple[dict[str, torch.Tensor], dict]:
        """(amax, metadata) of a committed layer."""
        from safetensors import safe_open

        path = self.path / _layer_name(index)
        with safe_open(path, "pt") as f:
            meta = json.loads((f.metadata() or {}).get("dsv4_calibrate_layer", "{}"))
            return {k: f.get_tensor(k) for k in f.keys()}, meta  # noqa: SIM118 - safe_open has no iteration

    def merged(self, layers: int) -> tuple[dict[str, torch.Tensor], list[dict]]:
        """Every committed layer's amax in one dict (sorted by name), and their metadata in layer order."""
        amax: dict[str, torch.Tensor] = {}
        metas = []
        for i in range(layers):
            part, meta = self.layer(i)
            clash = amax.keys() & part.keys()
            if clash:
                raise DsV4Error(
                    f"{self.path / _layer_name(i)}: key {min(clash)} is also in an earlier layer's file"
                )
            amax.update(part)
            metas.append(meta)
        return {k: amax[k] for k in sorted(amax)}, metas

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
