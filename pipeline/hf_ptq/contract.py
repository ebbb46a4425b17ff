"""The recorded hf_ptq contract (fixtures/hf_ptq_contract.json): loading it, and the differences between
two of them."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.errors import DsV4Error

CONTRACT_PATH = Path(__file__).resolve().parents[2] / "fixtures" / "hf_ptq_contract.json"
CONTRACT_SCHEMA = 1


class ContractError(DsV4Error):
    """hf_ptq.py has a shape the extractor does not recognise: read it and teach the extractor."""


def load_contract(path: Path = CONTRACT_PATH) -> dict[str, Any]:
    try:
        contract = json.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise DsV4Error(f"{path}: no recorded hf_ptq contract (regenerate: python -m pipeline.hf_ptq)") from e
    if contract.get("schema") != CONTRACT_SCHEMA:
        raise DsV4Error(
            f"{path}: key 'schema' is {contract.get('schema')!r}, this driver reads {CONTRACT_SCHEMA}"
        )
    return contract


def flags_by_dest(contract: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {flag["dest"]: flag for flag in contract["flags"]}


def contract_diff(recorded: Mapping[str, Any], fresh: Mapping[str, Any]) -> list[str]:
    """Human-readable differences, ignoring provenance (``produced_by``, ``source``)."""
    out: list[str] = []

    def walk(a: Any, b: Any, where: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                if where == "" and k in ("produced_by", "source"):
                    continue
                if k not in a:
                    out.append(f"{where}/{k}: new {b[k]!r}"[:300])
                elif k not in b:
                    out.append(f"{where}/{k}: gone (was {a[k]!r})"[:300])
                else:
                    walk(a[k], b[k], f"{where}/{k}")
        elif where == "/flags" and isinstance(a, list) and isinstance(b, list):
            walk({f["dest"]: f for f in a}, {f["dest"]: f for f in b}, where)
        elif a != b:
            out.append(f"{where}: recorded {a!r} -> now {b!r}"[:300])

    walk(json.loads(json.dumps(recorded)), json.loads(json.dumps(fresh)), "")
    return out
