"""Root conftest: registers the tiers of harness/markers.py and enforces their requirements."""

from __future__ import annotations

import functools

import pytest

from harness.markers import REFERENCE, REQUIREMENTS_BY_NAME, TIERS, required_tiers


def pytest_configure(config: pytest.Config) -> None:
    for tier in (*TIERS, REFERENCE):
        config.addinivalue_line("markers", f"{tier.name}: {tier.description} (runs in: {tier.provided_by})")
    # An env that exists to run a tier (tox sets DSV4_REQUIRE) must not pass by skipping it; CI must not
    # pass by skipping the checks against the reference data beside the clone.
    for name in sorted(required_tiers()):
        why = _missing(name)
        if why is not None:
            origin = (
                "CI is set (it needs ../shared beside the clone)"
                if name == REFERENCE.name
                else "DSV4_REQUIRE"
            )
            raise pytest.UsageError(f"{origin}: requirement '{name}' is not met: {why}")


@functools.cache
def _missing(tier_name: str) -> str | None:
    return REQUIREMENTS_BY_NAME[tier_name].missing()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for mark in item.iter_markers():
            tier = REQUIREMENTS_BY_NAME.get(mark.name)
            why = _missing(tier.name) if tier else None
            if why is not None:
                item.add_marker(
                    pytest.mark.skip(reason=f"[{tier.name}] {why}; run it with `{tier.provided_by}`")
                )
                break


def pytest_sessionstart(session: pytest.Session) -> None:
    import os

    if os.environ.get("PYTEST_XDIST_WORKER"):
        # one torch thread per xdist worker: -n auto already puts a worker on every core, and two
        # OpenMP pools per core made the 2-core laptop loop slower than running serially
        import torch

        torch.set_num_threads(1)


def pytest_addoption(parser: pytest.Parser) -> None:
    """The node's preflight options (`pytest -m b200 --source ...`, docs/preflight.md), defined in
    tests/preflight/conftest.py; registered here because pytest reads this hook only from the conftest
    files it loads at start-up, and this one always is."""
    from tests.preflight.conftest import add_b200_options

    add_b200_options(parser)
