"""fix-config snapshots of the full V4 Pro configs (the release's, the seeds' export, ModelOpt 0.47 +
transformers 5.23's), each with the 71,424 NVFP4 expert keys of a converted checkpoint. The helpers and
fixtures are those of tests/vllm_config/test_fix_config.py, where the rules are tested one by one."""

from __future__ import annotations

import pytest

from pipeline.vllm_config import VLLM_TARGETS, fix_config
from tests.vllm_config.test_fix_config import (
    json_snapshot,
    load_fixture,
    pro_mixed_keys,
    reference_config,
    summary,
)

pytestmark = pytest.mark.slow  # full scale: 71k expert names per case

__all__ = ["json_snapshot"]  # the fixture, imported for these tests


@pytest.mark.parametrize("target", VLLM_TARGETS)
def test_snapshot_release_config(target, json_snapshot):
    """The real V4 Pro config, as a converted mixed checkpoint's (release config + NVFP4 experts)."""
    result = fix_config(reference_config(), target=target, tensor_keys=pro_mixed_keys())
    assert summary(result, full_hfq=False) == json_snapshot


@pytest.mark.parametrize("target", VLLM_TARGETS)
def test_snapshot_seeds_export(target, json_snapshot):
    result = fix_config(load_fixture("seeds_export_config.json"), target=target, tensor_keys=pro_mixed_keys())
    assert summary(result, full_hfq=False) == json_snapshot


@pytest.mark.parametrize("target", VLLM_TARGETS)
def test_snapshot_export_047_t523(target, json_snapshot):
    result = fix_config(
        load_fixture("export_047_t523_config.json"), target=target, tensor_keys=pro_mixed_keys()
    )
    assert summary(result, full_hfq=False) == json_snapshot
