"""`dsv4 quantize --driver hf_ptq`, the node's driver: ModelOpt's own examples/hf_ptq/hf_ptq.py main()
(pipeline/hf_ptq/) run under our version-checked runtime patches, behind the guards of the in-process
driver: a BF16 source, a DST that is not inside it, one run per DST."""

from __future__ import annotations

import shutil
from pathlib import Path

from patches import modelopt_patches
from pipeline import hf_ptq
from pipeline.checkpoint import Layout, ensure_valid
from pipeline.checkpoint.writer import output_lock
from pipeline.errors import DsV4Error
from pipeline.quantize import check_output_paths
from pipeline.quantize_checks import check_destination, require_quant_env

STEP = "dsv4 quantize --driver hf_ptq"


def run_hf_ptq(cfg: hf_ptq.HfPtqConfig, src: Path, dst: Path, modelopt_repo: Path, *, overwrite: bool) -> str:
    """Run hf_ptq's main() for ``cfg`` from SRC into DST; returns which patches it reached, how often.
    Every patch must be reached: one that was not means ModelOpt moved its target."""
    # Run 1: an FP8 source broke batch probing; refuse it before hf_ptq loads anything
    ensure_valid(src, expect=Layout.BF16, step=STEP)
    check_destination(dst)
    # the same guards as the in-process driver: not inside the source, not a non-empty or foreign DST
    check_output_paths(src, dst, overwrite)
    require_quant_env()
    modelopt_patches.check_targets()
    # one run per DST, as the in-process driver; hf_ptq exports into DST itself, so an --overwrite
    # (allowed only of a folder dsv4 quantize wrote: check_output_paths) empties it first
    with output_lock(dst.parent, dst.with_name(f".{dst.name}.dsv4.lock"), subject=dst):
        check_output_paths(src, dst, overwrite)
        if overwrite and dst.is_dir():
            shutil.rmtree(dst)
        with modelopt_patches.applied() as patches:
            hf_ptq.run(cfg, modelopt_repo)
    unreached = [p.name for p in patches if p.calls == 0]
    if unreached:
        raise DsV4Error(
            f"{dst}: runtime patch(es) {', '.join(unreached)} were never reached on hf_ptq's export path: "
            "the installed ModelOpt moved their targets; update patches/modelopt_patches.py"
        )
    return ", ".join(f"{p.name} x{p.calls}" for p in patches)
