"""The vllm_node tier: the CUDA wheel of the vLLM the node runs, on a CPU (harness/vllm_node.py).

Session fixtures: the stand-in driver, the converted checkpoints (every kind x config target), and one
vLLM worker process per GPU generation that loads all of them (a fresh interpreter each: the platform
is process-wide in vLLM)."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

from harness import vllm_node
from harness.exports import as_transformers_export
from pipeline.vllm_config import VLLM_TARGETS

VERIFIED = (
    "vllm_node tier: verified that vLLM {version}'s own DeepSeek V4 model and DefaultModelLoader load every "
    "converted checkpoint kind (every parameter byte written, fused values byte-equal to the checkpoint) "
    "and which quantization/MoE methods it picks for SM100 and SM90; no kernels run"
)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    passed = [r for r in terminalreporter.stats.get("passed", []) if "test_node_vllm_loads.py" in r.nodeid]
    if passed and exitstatus == 0:  # say what the tier verified, and that no kernel ran
        terminalreporter.write_line(VERIFIED.format(version=vllm_node.wanted_version()))


@pytest.fixture(scope="session")
def libcuda_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    site = Path(sysconfig.get_paths()["purelib"])
    return vllm_node.build_stand_in_libcuda(tmp_path_factory.mktemp("libcuda"), site)


@pytest.fixture(scope="session")
def node_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """{(kind, target): converted checkpoint}; the exports' config.json as transformers 5.23 saves it
    (layer_types, mlp_layer_types...), which is what the node's export has and where the targets differ."""
    root = tmp_path_factory.mktemp("vllm-node-checkpoints")
    return vllm_node.build_converted(root, VLLM_TARGETS, export_config=as_transformers_export)


def case_name(kind: str, target: str) -> str:
    return f"{kind}-{target}"


@pytest.fixture(scope="session")
def node_reports(node_checkpoints, libcuda_dir, tmp_path_factory):
    """gpu ('sm100' / 'sm90') -> the worker's report for every checkpoint (run once per gpu, on demand)."""
    cache: dict[str, dict] = {}

    def get(gpu: str) -> dict:
        if gpu not in cache:
            jobs = {case_name(k, t): path for (k, t), path in node_checkpoints.items()}
            out = tmp_path_factory.mktemp(f"vllm-node-{gpu}")
            cache[gpu] = vllm_node.run_worker(gpu, jobs, out, libcuda_dir)
        return cache[gpu]

    return get
