"""The streaming steps' throughput against `cp` on the same disk, with peak RSS, measured in one run.

    python bench/stepbench.py [--steps dequant,experts,full,transcode,amax] [--gib 2] [--shard-gib 1]
                          [--device cpu|cuda|cpu,cuda] [--workers N] [--gpu-workers N[,N...]]
                          [--repeat N] [--workdir DIR] [--keep]

(bench/dequant.py and bench/convert.py run the same with their step(s) preselected.)

Builds, from V4 Pro's config (``../shared/reference``, else harness.tiny's copy of it), a one-layer
checkpoint of about --gib GiB whose byte mix per tensor role follows V4 Pro's (harness.byte_mix), with
real tensor shapes and random data of the right forms, in shards of at most --shard-gib GiB:

* the release format (MXFP4 experts, FP8 attention and shared experts, BF16/F32 rest), input of
  ``dequant`` and the release that ``transcode`` grafts from;
* the matching ModelOpt 0.47 NVFP4 export (dialect X) for the ``experts`` and ``full`` recipes, input
  of ``convert``; ``transcode`` is ``convert --graft-from <release> --experts transcode`` of the
  experts export.

The mix of each built checkpoint is printed beside V4 Pro's. Then, for each step in turn: `cp` of the
files the step reads + fsync; the step itself in a child process (its own peak RSS, VmHWM) + fsync of
its output; `cp` of the step's output (the same bytes it wrote) + fsync. With --device cpu,cuda the
step runs on each device between the same two cps, so the CPU and CUDA rows compare on one disk state. Before each of the three the
inputs are read once with `cat`, so every one starts with its inputs in the page cache (the machine's
RAM holds a few-GiB bench; the run says so). Each printed ratio is cp seconds / step seconds: 1.0
means the step keeps up with copying. With --repeat N the three are run N times in turn and the table
shows the medians (a shared machine's disk varies from one cp to the next by 2-4x; the spread is
printed too). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.amax_files import write_amax
from harness.byte_mix import GIB, bench_config, byte_mix, format_mix, nbytes, release_mix, release_specs

# each step's input checkpoint: the release, or the ModelOpt export of that recipe
STEP_INPUT = {
    "dequant": "release",
    "experts": "experts",
    "full": "full",
    "transcode": "experts",
    "amax": "release",
}
STEPS = tuple(STEP_INPUT)
RELEASE_INPUT = ("dequant", "transcode", "amax")  # the steps that read the release (transcode grafts from it)
REFERENCE_CONFIG = (
    Path(__file__).resolve().parents[2] / "shared" / "reference" / "deepseek-v4-pro" / "config.json"
)

# ---- the checkpoints --------------------------------------------------------------------------------


def reference_config() -> dict:
    if REFERENCE_CONFIG.exists():
        return json.loads(REFERENCE_CONFIG.read_text())
    from harness.tiny import _RELEASE_CONFIG  # the same config (tests/harness/test_tiny_factory.py)

    return copy.deepcopy(_RELEASE_CONFIG)


def random_tensor(key: str, dtype: str, shape: tuple[int, ...], gen):
    """Random values of the release's and ModelOpt's forms (global and input scales: the caller's)."""
    import torch

    if dtype in ("U8", "I8"):  # two E2M1 codes a byte
        t = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
        return t.view(torch.int8) if dtype == "I8" else t
    if dtype == "F8_E8M0":  # UE8M0 scales around 2^-8
        return torch.randint(115, 125, shape, generator=gen, dtype=torch.uint8).view(torch.float8_e8m0fnu)
    if dtype == "F8_E4M3" and key.endswith("weight_scale"):  # NVFP4 block scales in [1, 448]
        return torch.exp2(torch.rand(shape, generator=gen) * math.log2(448)).to(torch.float8_e4m3fn)
    if dtype == "F8_E4M3":  # FP8 weights
        return (torch.randn(shape, generator=gen) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    if dtype == "F32" and key.endswith("norm.weight"):
        return 1 + 0.05 * torch.randn(shape, generator=gen)
    if dtype == "F32":
        return 0.02 * torch.randn(shape, generator=gen)
    if dtype == "BF16":
        return (0.02 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
    raise ValueError(f"{key}: no random values for {dtype}")


def write_shards(out: Path, specs, make, shard_bytes: int) -> list[Path]:
    """Write ``specs`` [(name in file, dtype, shape)] in order into shards of at most ``shard_bytes``
    (``make(name, dtype, shape)`` gives each tensor), with the index; returns the shard paths."""
    from safetensors.torch import save_file

    groups: list[list] = [[]]
    size = 0
    for spec in specs:
        if groups[-1] and size + nbytes(spec[1], spec[2]) > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += nbytes(spec[1], spec[2])
    out.mkdir(parents=True, exist_ok=True)
    paths, weight_map = [], {}
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {key: make(key, dtype, shape).reshape(shape).contiguous() for key, dtype, shape in group}
        save_file(dict(sorted(tensors.items())), out / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        paths.append(out / name)
        del tensors
    total = sum(nbytes(d, s) for _, d, s in specs)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return paths


def build_release(out: Path, config: dict, shard_bytes: int, seed: int = 0) -> list[Path]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    paths = write_shards(out, release_specs(config), lambda k, d, s: random_tensor(k, d, s, gen), shard_bytes)
    (out / "config.json").write_text(json.dumps(config, indent=4))
    return paths


def export_specs(config: dict, recipe: str):
    from harness.exports import export_tensors

    return export_tensors(config, recipe, "N")


def build_export(out: Path, config: dict, recipe: str, shard_bytes: int, seed: int = 0) -> list[Path]:
    """The ModelOpt 0.47 export (dialect X) of ``config`` for ``recipe``, random codes and scales; one
    weight_scale_2 per ModelOpt fusion group, one input_scale per input group, as ModelOpt has them."""
    import torch

    from harness.exports import (
        _input_group,
        _synthetic_amax,
        _weight_group,
        modelopt_hf_quant_config,
        modelopt_quantization_config,
        to_x,
    )
    from pipeline.formats import nvfp4_global_scale

    config = {k: copy.deepcopy(v) for k, v in config.items() if k != "quantization_config"}
    config["quantization_config"] = modelopt_quantization_config(config, recipe, "X")
    gen = torch.Generator().manual_seed(seed)
    global_amax: dict[str, float] = {}
    by_x = {to_x(k): k for k, _, _ in export_specs(config, recipe)}

    def make(x_key: str, dtype: str, shape: tuple[int, ...]):
        key = by_x[x_key]
        if key.endswith(".weight_scale_2"):
            g = _weight_group(key.removesuffix(".weight_scale_2"), "shared")
            return nvfp4_global_scale(
                global_amax.setdefault(g, 0.1 + 0.5 * float(torch.rand((), generator=gen)))
            )
        if key.endswith(".input_scale"):
            return nvfp4_global_scale(
                _synthetic_amax(seed, _input_group(key.removesuffix(".input_scale"), "shared"))
            )
        return random_tensor(key, dtype, shape, gen)

    specs = [(to_x(k), d, s) for k, d, s in export_specs(config, recipe)]
    paths = write_shards(out, specs, make, shard_bytes)
    (out / "config.json").write_text(json.dumps(config, indent=4))
    hf_quant = modelopt_hf_quant_config(config["quantization_config"])
    (out / "hf_quant_config.json").write_text(json.dumps(hf_quant, indent=4))
    return paths


# ---- timing -----------------------------------------------------------------------------------------


def shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def sync(paths: list[Path]) -> None:
    """fsync these files and their folders (not `sync -f`, which flushes the whole filesystem)."""
    folders = sorted({str(p.parent) for p in paths})
    subprocess.run(["sync", *map(str, paths), *folders], check=True)


def warm(paths: list[Path]) -> None:
    """Read the files once, so that the timed action finds them in the page cache."""
    subprocess.run(["cat", *map(str, paths)], stdout=subprocess.DEVNULL, check=True)


SETTLE_SECONDS = 2.0  # before each timed action: a VM disk is still taking the last one's writes


def settle() -> None:
    """Let the previous timed action's writes drain out of the disk's own cache before the next is timed
    (fsync returns once the guest's bytes are handed over; a VM host may still be writing them)."""
    subprocess.run(["sync"], check=True)
    time.sleep(SETTLE_SECONDS)


def timed_cp(sources: list[Path], dst: Path) -> float:
    """Seconds to `cp` ``sources`` into ``dst`` (a new folder, removed after) and fsync the copies."""
    warm(sources)
    settle()
    dst.mkdir()
    start = time.perf_counter()
    subprocess.run(["cp", *map(str, sources), str(dst)], check=True)
    sync(shards(dst))
    seconds = time.perf_counter() - start
    shutil.rmtree(dst)
    return seconds


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def child(spec: dict) -> dict:
    """Run one step (in this process, a child of the bench); its seconds include fsync of the output."""
    from pipeline.convert import convert_checkpoint
    from pipeline.dequant import dequantize_checkpoint

    base = _status_kib("VmRSS")  # after the imports: what the interpreter and torch hold anyway
    src, dst = Path(spec["src"]), Path(spec["dst"])
    # The CUDA context (0.3-1 s, once per process) is started before the clock and reported on its own:
    # a fixed cost that a 3 GB bench would otherwise count against throughput and a 900 GB run does not see
    init = 0.0
    if spec["device"] == "cuda":
        import torch

        began = time.perf_counter()
        torch.zeros(1, device="cuda").add_(1)
        torch.cuda.synchronize()
        init = time.perf_counter() - began
    options = dict(
        device=spec["device"], workers=spec["workers"], gpu_workers=spec.get("gpu_workers"), progress=False
    )
    start = time.perf_counter()
    if spec["step"] == "dequant":
        result = dequantize_checkpoint(src, dst, **options)
    elif spec["step"] == "transcode":
        result = convert_checkpoint(src, dst, graft_from=spec["release"], experts="transcode", **options)
    elif spec["step"] == "amax":
        result = convert_checkpoint(src, dst, amax=Path(spec["amax"]), **options)
    else:
        result = convert_checkpoint(src, dst, **options)
    sync(shards(dst))
    seconds = time.perf_counter() - start
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across fork and exec, so a child would report the
    # bench's own peak (building the inputs) whenever that is the larger
    peak = _status_kib("VmHWM")
    return dict(
        seconds=seconds,
        read=result.read_bytes,
        written=result.written_bytes,
        base_kib=base,
        peak_kib=peak,
        init=init,
    )


def run_child(spec: dict, profile: Path | None = None) -> dict:
    """The step in a fresh interpreter; with ``profile``, under `py-spy record` (every thread, raw
    collapsed stacks into that file: the times then include py-spy's sampling)."""
    command = [sys.executable, __file__, "--child", json.dumps(spec)]
    if profile is not None:
        py_spy = shutil.which("py-spy") or "py-spy"
        command = [
            py_spy,
            "record",
            "--threads",
            "--idle",
            "-r",
            "50",
            "-f",
            "raw",
            "-o",
            str(profile),
            "--",
            *command,
        ]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"{spec['step']} failed:\n{proc.stdout}{proc.stderr}")
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


# ---- the run ----------------------------------------------------------------------------------------


def machine() -> str:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    return f"{os.cpu_count()} cores, {mem:.0f} GiB RAM, load average {load}"


def disk(path: Path) -> str:
    out = subprocess.run(
        ["df", "-h", "--output=source,fstype,size,avail", str(path)], capture_output=True, text=True
    )
    return " ".join(out.stdout.splitlines()[-1].split()) if out.returncode == 0 else "?"


def vs_cp(run: dict, cp: str) -> float:
    """One run's ratio: the seconds of its `cp` (``cp_in`` or ``cp_out``) over the step's seconds."""
    return run[cp] / run["res"]["seconds"]


def gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def main(argv: list[str] | None = None, steps: tuple[str, ...] = STEPS, doc: str = __doc__) -> int:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default=",".join(steps), help="comma-separated, of " + ", ".join(STEPS))
    parser.add_argument("--recipe", dest="steps", help="the same as --steps (convert's recipes)")
    parser.add_argument("--gib", type=float, default=2.0, help="size of the release checkpoint to build")
    parser.add_argument("--shard-gib", type=float, default=1.0, help="largest shard of the built inputs")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="converter threads (default: the cores available, as the steps)",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="cpu, cuda, or both (cpu,cuda): each device runs on the same inputs between the same cps",
    )
    parser.add_argument(
        "--gpu-workers",
        default=None,
        help="the converter threads on the GPU in the cuda rows (default: the steps' own); a "
        "comma-separated list runs a cuda row for each (e.g. 2,4,16)",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="run cp in, the step and cp out N times each; print medians"
    )
    parser.add_argument("--workdir", type=Path, default=None, help="where to build (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the built inputs")
    parser.add_argument(
        "--profile-dir",
        type=Path,
        default=None,
        help="run each step under `py-spy record` (on PATH) into DIR/<step>.txt; its times are then slower",
    )
    args = parser.parse_args(argv)
    if args.workers is None:
        from pipeline.step_options import available_cores

        args.workers = available_cores()
    chosen = [s.strip() for s in args.steps.split(",") if s.strip()]
    if unknown := set(chosen) - set(STEPS):
        parser.error(f"unknown step(s) {sorted(unknown)}; known: {', '.join(STEPS)}")
    devices = [d.strip() for d in args.device.split(",") if d.strip()]
    if not devices or set(devices) - {"cpu", "cuda"} or len(set(devices)) != len(devices):
        parser.error(f"--device: cpu, cuda or cpu,cuda; got {args.device!r}")
    # (row label, device, --gpu-workers) of each row: one per --gpu-workers value on CUDA
    gpu_workers = [None] if args.gpu_workers is None else [int(n) for n in args.gpu_workers.split(",")]
    setups = [
        (device if g is None or device == "cpu" else f"cuda g{g}", device, None if device == "cpu" else g)
        for device in devices
        for g in (gpu_workers if device == "cuda" else [None])
    ]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="dsv4-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    reference = reference_config()
    config = bench_config(reference, args.gib)
    shard_bytes = int(args.shard_gib * GIB)
    print(f"machine: {machine()}; workdir {work} on {disk(work)}")
    print(
        f"bench checkpoint: 1 layer (compress ratio 4), {config['n_routed_experts']} routed experts, "
        f"{config['num_attention_heads']} heads, vocab {config['vocab_size']}; shards <= {args.shard_gib:g} GiB"
    )
    rows = []
    began = time.perf_counter()
    try:
        release = work / "release"
        if set(RELEASE_INPUT) & set(chosen):
            build_release(release, config, shard_bytes)
            write_amax(release, work / "amax.safetensors")
            print("release (input of dequant and amax, graft source of transcode):")
            print(format_mix(release_mix(config), release_mix(reference), "release"))
        exports = {}
        for recipe in ("experts", "full"):
            if recipe in {STEP_INPUT[step] for step in chosen}:
                exports[recipe] = work / f"export-{recipe}"
                build_export(exports[recipe], config, recipe, shard_bytes)
                print(f"export, recipe {recipe} (input of convert):")
                print(
                    format_mix(
                        byte_mix(export_specs(config, recipe)),
                        byte_mix(export_specs(reference, recipe)),
                        f"{recipe} export",
                    )
                )
        sync([p for p in work.rglob("*") if p.is_file()])  # built inputs on disk before anything is timed
        print(f"inputs built in {time.perf_counter() - began:.0f} s", flush=True)
        for step in chosen:
            src = release if STEP_INPUT[step] == "release" else exports[STEP_INPUT[step]]
            reads = shards(release) if step in RELEASE_INPUT else shards(src)
            out = work / f"out-{step}"
            spec = dict(step=step, src=str(src), dst=str(out), workers=args.workers)
            spec.update(release=str(release), amax=str(work / "amax.safetensors"))
            runs = {label: [] for label, _, _ in setups}
            for turn in range(max(1, args.repeat)):
                cp_in = timed_cp(reads, work / "cp-in")
                results = {}
                # each device on the same inputs between the same two cps; the order alternates per turn
                for label, device, g in setups if turn % 2 == 0 else setups[::-1]:
                    shutil.rmtree(out, ignore_errors=True)
                    warm(reads)
                    settle()
                    profile = None
                    if args.profile_dir is not None:
                        args.profile_dir.mkdir(parents=True, exist_ok=True)
                        profile = args.profile_dir.resolve() / f"{step}-{label.replace(' ', '-')}.txt"
                    results[label] = run_child(dict(spec, device=device, gpu_workers=g), profile)
                written = shards(out)  # the same bytes from every device (tests/convert, tests/dequant)
                cp_out = timed_cp(written, work / "cp-out")
                for label in runs:
                    runs[label].append(dict(res=results[label], cp_in=cp_in, cp_out=cp_out))
            for label, device, _ in setups:
                rows.append(
                    dict(
                        step=step,
                        label=label,
                        device=device,
                        runs=runs[label],
                        in_bytes=sum(p.stat().st_size for p in reads),
                        in_shard=max(p.stat().st_size for p in reads),
                        out_shard=max(p.stat().st_size for p in written),
                    )
                )
            shutil.rmtree(out)
            for label in runs:  # each run as it ends, so a run cut short still shows its ratios
                times = ", ".join(
                    f"{r['res']['seconds']:.1f} s (cp out {r['cp_out']:.1f} s: {vs_cp(r, 'cp_out'):.2f}x)"
                    for r in runs[label]
                )
                print(f"  {step} on {label}: {times}", flush=True)
    finally:
        if not args.keep:
            for path in work.iterdir():
                shutil.rmtree(path, ignore_errors=True)
            if args.workdir is None:
                shutil.rmtree(work, ignore_errors=True)
    print(
        f"\ndevice={args.device} workers={args.workers} gpu-workers={args.gpu_workers or 'default'}; inputs in the page cache (read with cat) before each "
        f"cp and step; every time includes fsync of what it wrote; machine now: {machine()}"
    )
    head = (
        f"{'step':<10} {'device':<9} {'in GB':>6} {'out GB':>6} {'s':>7} {'read GB/s':>9} {'wr GB/s':>8} {'cp in s':>8} "
        f"{'cp out s':>8} {'vs cp in':>8} {'vs cp out':>9} {'peak RSS':>8} {'base RSS':>8} {'in shard':>8} {'out shard':>9}"
    )
    print(head)
    for r in rows:
        res = r["runs"][0]["res"]  # read, written and peak RSS are the same in every run
        s = median([x["res"]["seconds"] for x in r["runs"]])
        cp_in, cp_out = (median([x[k] for x in r["runs"]]) for k in ("cp_in", "cp_out"))
        vs_in, vs_out = (median([vs_cp(x, k) for x in r["runs"]]) for k in ("cp_in", "cp_out"))
        print(
            f"{r['step']:<10} {r['label']:<9} {gb(res['read']):>6} {gb(res['written']):>6} {s:7.1f} {res['read'] / s / 1e9:9.3f} "
            f"{res['written'] / s / 1e9:8.3f} {cp_in:8.1f} {cp_out:8.1f} {vs_in:8.2f} "
            f"{vs_out:9.2f} {gb(max(x['res']['peak_kib'] for x in r['runs']) * 1024):>8} "
            f"{gb(res['base_kib'] * 1024):>8} {gb(r['in_shard']):>8} {gb(r['out_shard']):>9}"
        )
    if max(len(r["runs"]) for r in rows) > 1:
        print("the spread over the runs (each run's vs cp out):")
        for r in rows:
            ratios = sorted(vs_cp(x, "cp_out") for x in r["runs"])
            print(f"  {r['step']:<10} {r['label']:<9} " + " ".join(f"{v:.2f}" for v in ratios))
    inits = [x["res"]["init"] for r in rows for x in r["runs"] if r["device"] == "cuda"]
    if inits:
        print(
            f"CUDA context, started in each cuda child before its clock and not in s: {min(inits):.2f}-"
            f"{max(inits):.2f} s"
        )
    print(
        "GB = 1e9 bytes. Each figure is the median of the runs (--repeat). vs cp = cp seconds / step seconds (in: cp of the files the step reads; out: cp of the "
        "files it wrote). peak RSS: the step's child process (VmHWM); base RSS: the same process after its "
        "imports, before the step; compare peak RSS with 2x the largest shard (in shard, out shard)."
    )
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(child(json.loads(sys.argv[2]))))
        sys.exit(0)
    sys.exit(main())
