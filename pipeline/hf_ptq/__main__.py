"""`python -m pipeline.hf_ptq REPO`: regenerate the recorded contract (fixtures/hf_ptq_contract.json)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from .contract import CONTRACT_PATH
from .driver import locate_hf_ptq
from .extract import extract_contract


def _main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pipeline.hf_ptq", description="Regenerate the recorded hf_ptq contract."
    )
    ap.add_argument("repo", type=Path, help="a ModelOpt checkout (git clone of NVIDIA/Model-Optimizer)")
    ap.add_argument("--commit", help="the checkout's commit, when it is not a git work tree")
    ap.add_argument("--note", help="where the checkout came from / how it relates to the installed wheel")
    ap.add_argument("--out", type=Path, default=CONTRACT_PATH)
    ap.add_argument("--no-runtime", action="store_true", help="do not import hf_ptq (no ModelOpt here)")
    ns = ap.parse_args(argv)
    contract = extract_contract(
        locate_hf_ptq(ns.repo), commit=ns.commit, note=ns.note, resolve_runtime=not ns.no_runtime
    )
    ns.out.write_text(json.dumps(contract, indent=1, sort_keys=False) + "\n")
    print(f"wrote {ns.out}: {len(contract['flags'])} flags, {len(contract['main_reads']['required'])} attrs")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
