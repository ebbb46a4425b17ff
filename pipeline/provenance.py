"""Which code is running: a digest of this package's own source files.

Seeds Run 5 failed because the fix of Run 4 "wasn't synced properly": the node ran older code than the
laptop had tested, and nothing said so. `dsv4 --version` prints this digest, every step's report
records it, and the node's preflight compares it with the one the laptop expects (``--expect-code``),
so stale code is caught before a run instead of hours into it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

PACKAGES = ("pipeline", "patches", "harness")  # what the steps, the plugin and the preflight run


def code_digest(root: Path | None = None) -> str:
    """sha256 over the relative path and bytes of every .py file of PACKAGES under ``root`` (default: the
    installed source tree), in sorted order; the first 16 hex digits."""
    root = Path(__file__).resolve().parents[1] if root is None else Path(root)
    h = hashlib.sha256()
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            h.update(path.relative_to(root).as_posix().encode() + b"\0")
            h.update(path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def run_versions(packages: tuple[str, ...]) -> dict[str, str]:
    """What a run records of what ran it: each installed package's version, this package's version and
    the digest of its code (steps write it into their reports and files)."""
    from importlib.metadata import version

    from pipeline import __version__

    return {
        **{name: version(name) for name in packages},
        "dsv4-nvfp4": __version__,
        "dsv4-code": code_digest(),
    }
