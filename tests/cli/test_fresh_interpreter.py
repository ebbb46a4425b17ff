"""A fresh interpreter (a subprocess costs seconds here, so this is in the slow tier): the unit tier's
modules import without transformers, ModelOpt or vLLM, and `python -m pipeline --version` answers."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import SUBCOMMANDS

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


# Everything a unit-tier test imports: none of it may pull in transformers, ModelOpt or vLLM.
UNIT_TIER_MODULES = (
    "pipeline.cli",
    *SUBCOMMANDS,
    "pipeline.formats",
    "pipeline.checkpoint",
    "pipeline.release_layout",
    "pipeline.dequant",
    "pipeline.vllm_config",
    "pipeline.hf_ptq",
    "harness.markers",
    "harness.tiny",
    "harness.reference",
    "harness.checkpoints",
    "harness.replica",
)


def test_fresh_interpreter_imports_no_heavy_package_and_runs_dsv4_version():
    """One fresh interpreter (a subprocess costs seconds here): the unit tier's modules import without
    transformers, ModelOpt or vLLM, and `python -m pipeline --version` answers."""
    code = (
        f"import sys, importlib; [importlib.import_module(m) for m in {UNIT_TIER_MODULES!r}];"
        "print([m for m in ('transformers', 'modelopt', 'vllm') if m in sys.modules]);"
        "sys.argv = ['dsv4', '--version']; import runpy; runpy.run_module('pipeline', run_name='__main__')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    heavy, version = out.stdout.splitlines()
    assert heavy == "[]"
    assert out.returncode == 0 and re.match(r"dsv4-nvfp4 \S+ \(code [0-9a-f]{16}\)$", version)
