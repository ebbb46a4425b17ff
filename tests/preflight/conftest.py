"""Options and fixtures of the node's preflight, `pytest -m b200 --source RELEASE [...]` (docs/preflight.md).

``--path one-gpu`` (the default) checks the node for the one-GPU path of issue 16 (`dsv4 calibrate`, then
`dsv4 convert RELEASE --amax`): one GPU for calibration, about 1 TB of disk beyond the release, tens of
GiB of RAM, and its canary. ``--path bf16`` checks for the seeds' path instead (the 3.2 TB BF16 copy,
ModelOpt over 8 GPUs, the export): 8 Blackwell GPUs, 5 TB of disk, the BF16 model in RAM, hf_ptq.

pytest calls ``pytest_addoption`` only in the conftest files it loads at start-up, not in this one,
so the root conftest.py's hook calls ``add_b200_options`` below: `pytest -m b200 --source X` works from
the repository root as well as `pytest tests/preflight/test_node_preflight.py ...`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness import preflight as P
from pipeline.vllm_config import DEFAULT_TARGET, VLLM_TARGETS


def add_b200_options(parser: pytest.Parser) -> None:
    g = parser.getgroup("b200", "the 8xB200 node's preflight (pytest -m b200; docs/preflight.md)")
    g.addoption(
        "--path",
        choices=P.PATHS,
        default=P.PATH_ONE_GPU,
        help="the run to check for: one-gpu (dsv4 calibrate + convert --amax: one GPU, ~1 TB beyond the "
        "release; the default) or bf16 (dequant to a 3.2 TB BF16 copy, ModelOpt on 8 GPUs, export, convert)",
    )
    g.addoption(
        "--calib-samples",
        type=int,
        default=P.CALIB_SAMPLES,
        help=f"one-gpu: the run's dsv4 calibrate --samples (default {P.CALIB_SAMPLES}); sizes GPU, RAM, disk",
    )
    g.addoption(
        "--calib-seq-len",
        type=int,
        default=P.CALIB_SEQ_LEN,
        help=f"one-gpu: the run's dsv4 calibrate --seq-len (default {P.CALIB_SEQ_LEN}); sizes GPU, RAM, disk",
    )
    g.addoption(
        "--amax",
        metavar="AMAX",
        help="one-gpu: an AMAX file dsv4 calibrate already wrote (counts as written)",
    )
    g.addoption("--source", metavar="RELEASE", help="the DeepSeek V4 Pro release checkpoint directory")
    g.addoption("--export", metavar="EXPORT", help="a ModelOpt NVFP4 export to validate (header-only)")
    g.addoption(
        "--converted",
        metavar="CKPT",
        help="a `dsv4 convert` output to validate (header-only) and, with --gsm8k, to score",
    )
    g.addoption("--modelopt-repo", metavar="REPO", help="the Model-Optimizer checkout hf_ptq runs from")
    g.addoption(
        "--expect-code", metavar="DIGEST", help="the code digest `dsv4 --version` printed on the laptop"
    )
    g.addoption(
        "--outputs",
        metavar="DIR",
        help="where the run's outputs will go (AMAX and its work folder, the converted checkpoint; on the bf16 "
        "path the BF16 copy and the export; default: beside --source)",
    )
    g.addoption(
        "--canary-dir", metavar="DIR", help="the canary's work directory (default: OUTPUTS/dsv4-canary)"
    )
    g.addoption("--keep-canary", action="store_true", help="keep the canary's checkpoints and logs")
    g.addoption(
        "--vllm-python",
        metavar="PYTHON",
        default=sys.executable,
        help="the serving env's interpreter (vLLM, lm_eval); its `vllm` beside it serves the canary",
    )
    g.addoption(
        "--target-vllm", choices=VLLM_TARGETS, default=DEFAULT_TARGET, help="vLLM the run serves with"
    )
    g.addoption("--gpus", type=int, default=P.NODE_GPUS, help=f"GPUs the run uses (default {P.NODE_GPUS})")
    g.addoption(
        "--gsm8k", action="store_true", help="also score --converted on GSM8K (lm-evaluation-harness, vLLM)"
    )
    g.addoption(
        "--gsm8k-threshold", type=float, default=P.GSM8K_THRESHOLD, help="lowest accepted exact match"
    )
    g.addoption("--gsm8k-limit", type=int, default=0, help="questions to score (default: all 1,319)")


@dataclass(frozen=True)
class NodeOptions:
    source: Path | None
    export: Path | None
    converted: Path | None
    modelopt_repo: Path | None
    expect_code: str | None
    outputs: Path | None
    canary_dir: Path | None
    keep_canary: bool
    vllm_python: str
    target_vllm: str
    gpus: int
    gsm8k: bool
    gsm8k_threshold: float
    gsm8k_limit: int
    # defaults: NodeOptions built by hand (tests/preflight/test_preflight.py) check the leading path
    path: str = P.PATH_ONE_GPU
    calib_samples: int = P.CALIB_SAMPLES
    calib_seq_len: int = P.CALIB_SEQ_LEN
    amax: Path | None = None


def _path(value: str | None) -> Path | None:
    return Path(value).expanduser() if value else None


@pytest.fixture(scope="session")
def node(request: pytest.FixtureRequest) -> NodeOptions:
    o = request.config.getoption
    source = _path(o("--source"))
    outputs = _path(o("--outputs")) or (source.resolve().parent if source else None)
    return NodeOptions(
        source=source,
        export=_path(o("--export")),
        converted=_path(o("--converted")),
        modelopt_repo=_path(o("--modelopt-repo")),
        expect_code=o("--expect-code"),
        outputs=outputs,
        canary_dir=_path(o("--canary-dir")) or (outputs / "dsv4-canary" if outputs else None),
        keep_canary=o("--keep-canary"),
        vllm_python=o("--vllm-python"),
        target_vllm=o("--target-vllm"),
        gpus=o("--gpus"),
        gsm8k=o("--gsm8k"),
        gsm8k_threshold=o("--gsm8k-threshold"),
        gsm8k_limit=o("--gsm8k-limit"),
        path=o("--path"),
        calib_samples=o("--calib-samples"),
        calib_seq_len=o("--calib-seq-len"),
        amax=_path(o("--amax")),
    )


@pytest.fixture(scope="session")
def source(node: NodeOptions) -> Path:
    if node.source is None:
        pytest.skip("pass --source /path/to/DeepSeek-V4-Pro (the release checkpoint directory)")
    if not node.source.is_dir():
        pytest.fail(f"--source {node.source}: not a directory")
    return node.source


@pytest.fixture(scope="session")
def source_config(source: Path) -> dict:
    """The release's config.json: the one-GPU path's memory is derived from it and the tensor table."""
    from pipeline.checkpoint import Checkpoint

    config = Checkpoint.open(source).config
    if config is None:
        pytest.fail(f"--source {source}: no config.json", pytrace=False)
    return config


@pytest.fixture(scope="session")
def disk_plan(source: Path, node: NodeOptions) -> list[tuple[str, int]]:
    """The disk plan of the path checked (``--path``)."""
    if node.path == P.PATH_ONE_GPU:
        return P.one_gpu_disk_plan(source, samples=node.calib_samples, seq_len=node.calib_seq_len)
    return P.disk_plan(source)


@pytest.fixture(scope="session")
def gpus() -> list[P.GpuInfo]:
    return P.gpu_inventory()
