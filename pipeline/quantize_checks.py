"""What both `dsv4 quantize` drivers (in-process, hf_ptq) check before any work, so that a missing
package or a mistyped DST is one line, not a traceback from deep inside ModelOpt."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from pipeline.errors import DsV4Error

# the report `dsv4 quantize` writes into its export and its calibrated state: --export-only and
# --overwrite know a folder it wrote by it, and pipeline/amax/read.py reads from it which ModelOpt
# calibrated an amax snapshot
REPORT_NAME = "dsv4-quantize-report.json"

# (module imported, package that provides it): what `dsv4 quantize` needs beyond the base install
QUANT_PACKAGES: tuple[tuple[str, str], ...] = (
    ("modelopt", "nvidia-modelopt"),
    ("transformers", "transformers"),
)


def require_quant_env(step: str = "dsv4 quantize") -> None:
    """ModelOpt and transformers are the `quant` extra, not the base install: say so instead of an
    ImportError traceback from deep inside the step."""
    absent = [package for module, package in QUANT_PACKAGES if importlib.util.find_spec(module) is None]
    if absent:
        raise DsV4Error(
            f"{step} needs {' and '.join(absent)}, not installed in {sys.executable}: "
            "pip install -e '.[quant]' (in its own venv: ModelOpt and vLLM do not share one)"
        )


def check_destination(dst: Path) -> None:
    """DST is a directory the step creates or replaces; a file there is a typo, not something to delete."""
    if dst.exists() and not dst.is_dir():
        raise DsV4Error(f"{dst}: exists and is not a directory; the export is a directory, pick another DST")
