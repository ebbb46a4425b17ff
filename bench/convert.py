"""`dsv4 convert` throughput against `cp` of the same bytes on the same disk, from one run.

    python bench/convert.py [--workdir DIR] [--gib 2] [--workers N] [--device cpu|cuda]
                            [--recipe experts|full] [--keep]

Builds a synthetic ModelOpt 0.47 NVFP4 export (dialect X: transformers names under ``model.``) of about
--gib GiB: a one-layer model with V4 Pro's shapes and as many routed experts as fit, every key, dtype
and shape as harness.exports.export_tensors lists them for --recipe, random E2M1 codes, realistic scales
(e4m3 block scales 1..448, weight_scale_2 ~1e-4 shared by an expert's w1/w3 as ModelOpt 0.47 shares
it, synthetic input scales). Its config.json is V4 Pro's with num_hidden_layers=1, n_routed_experts=N,
num_hash_layers=0, compress_ratios=[4, 0] (a CSA layer, e.g. layer 2: compressor and indexer) and
vocab_size scaled by the fraction of V4 Pro's routed experts present (the real vocabulary's 3.7 GB of
embedding and head would be most of a 2 GiB export instead of 0.4 % of it).

Then, with the export in the page cache: `cp` of its shard(s) + sync; `convert_checkpoint` (what
`dsv4 convert` runs) + sync; `cp` of convert's output + sync. Prints the rates, the ratios (cp seconds /
convert seconds, against copying the input and against copying the same output bytes), the bytes read
per action and the per-action tensor counts. Nothing is asserted.

One layer of V4 Pro attention, shared expert, compressor and indexer is 0.8 GB in BF16 (experts
recipe): 5 % of a real export's bytes but about 40 % of a 2 GiB one, so a small export over-weights the
BF16 -> FP8 path. The printed byte mix says how far a run is from the real one (routed experts 94 % of
an experts-recipe export, 97 % of a full-recipe one); --gib 16 comes close.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.exports import (
    _input_group,
    _synthetic_amax,
    _weight_group,
    export_tensors,
    modelopt_hf_quant_config,
    modelopt_quantization_config,
    to_x,
)
from pipeline.checkpoint import dtypes
from pipeline.convert import convert_checkpoint, plan_convert
from pipeline.formats import nvfp4_global_scale
from pipeline.mapping import target_layout

# ../shared/reference next to the repo; elsewhere (a lent GPU machine) harness.tiny's copy of the same
# config (tests/harness/test_tiny_factory.py checks the two agree)
REFERENCE_CONFIG = (
    Path(__file__).resolve().parents[2] / "shared" / "reference" / "deepseek-v4-pro" / "config.json"
)
LAYER_RATIO = 4  # compress ratio of the layer the synthetic model has (V4 Pro's layers 2, 4, ..., 60)
SHARD_BYTES = 5 * 1024**3
GIB = 1024**3


def nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * dtypes.itemsize(dtype)


def bench_config(reference: dict, n_experts: int, recipe: str) -> dict:
    """V4 Pro's config for a one-layer model with ``n_routed_experts`` experts, as a ModelOpt export has it."""
    cfg = {k: copy.deepcopy(v) for k, v in reference.items() if k != "quantization_config"}
    real_experts = reference["num_hidden_layers"] * reference["n_routed_experts"]
    cfg.update(
        num_hidden_layers=1,
        n_routed_experts=n_experts,
        num_hash_layers=0,
        compress_ratios=[LAYER_RATIO, 0],
        num_nextn_predict_layers=1,
        vocab_size=max(64, round(reference["vocab_size"] * n_experts / real_experts)),
    )
    cfg["quantization_config"] = modelopt_quantization_config(cfg, recipe, "X")
    return cfg


def size_experts(reference: dict, gib: float, recipe: str) -> int:
    """The number of routed experts that brings the export closest to ``gib`` GiB (at least 1)."""

    def total(n: int) -> int:
        return sum(
            nbytes(d, s) for _, d, s in export_tensors(bench_config(reference, n, recipe), recipe, "N")
        )

    fixed, per_expert = total(1), total(2) - total(1)
    return max(1, round((gib * GIB - fixed + per_expert) / per_expert))


def synthetic_tensor(native: str, dtype: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Random values of ModelOpt's forms; NVFP4 global and input scales are set by the caller."""
    if dtype == "U8":  # two E2M1 codes a byte
        return torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
    if dtype == "F8_E4M3":  # block scales, log-uniform in [1, 448]
        return torch.exp2(torch.rand(shape, generator=gen) * math.log2(448)).to(torch.float8_e4m3fn)
    if dtype == "F32" and native.endswith("norm.weight"):
        return 1 + 0.05 * torch.randn(shape, generator=gen)
    if dtype == "F32":
        return 0.02 * torch.randn(shape, generator=gen)
    if dtype == "BF16":
        return (0.02 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
    raise ValueError(f"{native}: no synthetic values for {dtype}")


def synthetic_export(out: Path, gib: float, recipe: str, seed: int = 0) -> tuple[dict, list[Path]]:
    """Write the export (config.json, hf_quant_config.json, shards, index); return its config and shards."""
    if REFERENCE_CONFIG.exists():
        reference = json.loads(REFERENCE_CONFIG.read_text())
    else:
        from harness.tiny import _RELEASE_CONFIG

        reference = copy.deepcopy(_RELEASE_CONFIG)
    config = bench_config(reference, size_experts(reference, gib, recipe), recipe)
    native = export_tensors(config, recipe, "N")
    gen = torch.Generator().manual_seed(seed)
    # one weight_scale_2 per ModelOpt fusion group (an expert's w1/w3 share one), one input_scale per
    # input group (every expert of a projection shares one)
    global_amax: dict[str, float] = {}
    shards: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
    size = 0
    for t in native:
        if shards[-1] and size + nbytes(t[1], t[2]) > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes(t[1], t[2])
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    weight_map: dict[str, str] = {}
    for i, group in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors: dict[str, torch.Tensor] = {}
        for key, dtype, shape in group:
            if key.endswith(".weight_scale_2"):
                g = _weight_group(key.removesuffix(".weight_scale_2"), "shared")
                amax = global_amax.setdefault(g, 0.1 + 0.5 * float(torch.rand((), generator=gen)))
                t = nvfp4_global_scale(amax)
            elif key.endswith(".input_scale"):
                t = nvfp4_global_scale(
                    _synthetic_amax(seed, _input_group(key.removesuffix(".input_scale"), "shared"))
                )
            else:
                t = synthetic_tensor(key, dtype, shape, gen)
            tensors[to_x(key)] = t.reshape(shape).contiguous()
            weight_map[to_x(key)] = name
        save_file(dict(sorted(tensors.items())), out / name, metadata={"format": "pt"})
        paths.append(out / name)
        del tensors
    total = sum(nbytes(d, s) for _, d, s in native)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(config, indent=4))
    hf_quant = modelopt_hf_quant_config(config["quantization_config"])
    (out / "hf_quant_config.json").write_text(json.dumps(hf_quant, indent=4))
    return config, paths


def sync(root: Path) -> None:
    """fsync every file under ``root`` (not `sync -f`: that would also flush whatever else is dirty on the
    filesystem, e.g. the export save_file has just written, or another process's files)."""
    files = sorted(str(p) for p in root.rglob("*") if p.is_file())
    subprocess.run(["sync", *files, str(root)], check=True)


def timed_copy(sources: list[Path], dst: Path) -> float:
    """Seconds to `cp` ``sources`` into ``dst`` and fsync the copies."""
    dst.mkdir()
    start = time.perf_counter()
    subprocess.run(["cp", "-r", *map(str, sources), str(dst)], check=True)
    sync(dst)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where to build (default: a temp dir); its export/, converted/ and copy/ are replaced",
    )
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--recipe", choices=("experts", "full"), default="experts")
    parser.add_argument("--keep", action="store_true", help="keep the export and convert's output")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="dsv4-bench-convert-"))
    src, out, copy_dir = work / "export", work / "converted", work / "copy"
    try:
        for path in (src, out, copy_dir):  # an earlier --keep run's
            shutil.rmtree(path, ignore_errors=True)
        config, shards = synthetic_export(src, args.gib, args.recipe)
        # the export must be exactly what the converter accepts: every target key but the MTP block's
        plan = plan_convert(src)
        want = {k for k in target_layout(config) if not k.startswith("mtp.")}
        if set(plan.layout) != want:
            raise SystemExit(
                f"synthetic export does not give the target layout: {sorted(set(plan.layout) ^ want)[:5]}"
            )
        size = sum(p.stat().st_size for p in shards)
        sync(src)  # the export on disk first, so that no step below pays for its writeback
        subprocess.run(["cat", *map(str, shards)], stdout=subprocess.DEVNULL, check=True)  # same cache state
        cp_s = timed_copy(shards, copy_dir)
        shutil.rmtree(copy_dir)
        start = time.perf_counter()
        result = convert_checkpoint(src, out, device=args.device, workers=args.workers, progress=False)
        sync(out)
        cv_s = time.perf_counter() - start
        if not args.keep:
            shutil.rmtree(src)  # room for the copy of the output
        # the I/O floor: copying as many bytes as convert wrote (its own output, so the same disk)
        cp_out_s = timed_copy(sorted(out.iterdir()), copy_dir)
        shutil.rmtree(copy_dir)
        read, written = result.read_bytes, result.written_bytes

        by_action: Counter[str] = Counter()
        for (_, _, action), n in result.plan.counts().items():
            by_action[action] += n
        read_by: Counter[str] = Counter()
        for job in result.plan.jobs.values():
            read_by[job.action] += job.read_bytes
        experts = config["n_routed_experts"]
        print(
            f"export: {size / 1e9:.2f} GB in {len(shards)} shard(s), recipe={args.recipe}, 1 layer "
            f"(compress ratio {LAYER_RATIO}), {experts} routed experts, vocab {config['vocab_size']}"
        )
        print(f"cp of the export:        {cp_s:7.2f} s  {size / cp_s / 1e9:6.2f} GB/s")
        print(
            f"cp of convert's output:  {cp_out_s:7.2f} s  {written / cp_out_s / 1e9:6.2f} GB/s ({written / 1e9:.2f} GB)"
        )
        print(
            f"convert:                 {cv_s:7.2f} s  {read / cv_s / 1e9:6.2f} GB/s read, "
            f"{written / cv_s / 1e9:6.2f} GB/s written ({written / read:.2f}x the input; device={args.device}, "
            f"workers={args.workers})"
        )
        print(f"ratio vs cp of the export (cp time / convert time):      {cp_s / cv_s:.2f}")
        print(f"ratio vs cp of the same output bytes (the disk's floor): {cp_out_s / cv_s:.2f}")
        print("  action                        tensors  read GB  of input")
        for action in sorted(by_action, key=lambda a: -read_by[a]):
            print(
                f"  {action:<28} {by_action[action]:>8} {read_by[action] / 1e9:8.3f} {read_by[action] / read:8.1%}"
            )
    finally:
        for path in (copy_dir,) if args.keep else (src, out, copy_dir):
            shutil.rmtree(path, ignore_errors=True)
        if args.workdir is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
