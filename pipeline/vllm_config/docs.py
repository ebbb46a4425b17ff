"""The rule table as data, for the docs, --json and the snapshot tests."""

from __future__ import annotations

from typing import Any

from .table import RULES


def rule_table() -> list[dict[str, Any]]:
    """The rule table as data (for docs, --json and the snapshot tests)."""
    return [
        {"rule": r.name, "keys": list(r.keys), "versions": list(r.versions), "reason": r.reason}
        for r in RULES
    ]
