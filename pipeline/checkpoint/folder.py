"""What a checkpoint folder holds besides its tensors, and the disk it is on: the files a step copies
into its output unchanged, and the free space a dry run reports."""

from __future__ import annotations

import shutil
from collections.abc import Collection
from pathlib import Path

from .reader import INDEX_NAME


def files_to_copy(
    root: Path, *, rewritten: Collection[str] = (), skip_suffixes: tuple[str, ...] = (".safetensors",)
) -> list[Path]:
    """The folder's other files (tokenizer, generation config, ...) that a step copies unchanged: not
    hidden (dsv4's journal and lock are), not a shard (nor any name ending in ``skip_suffixes``), not the
    index, and not a file the step writes itself (``rewritten``: its config.json, its report)."""
    return [
        p
        for p in sorted(root.iterdir())
        if p.is_file()
        and not p.name.startswith(".")
        and not p.name.endswith(skip_suffixes)
        and p.name not in (INDEX_NAME, *rewritten)
    ]


def free_disk(dst: str | Path) -> tuple[Path, int]:
    """(the folder an output will be on, its free bytes): ``dst`` itself or its nearest existing parent."""
    out = Path(dst).resolve()
    probe = out if out.exists() else next(p for p in out.parents if p.exists())
    return probe, shutil.disk_usage(probe).free


__all__ = ["files_to_copy", "free_disk"]
