"""One full-size V4 Pro decoder layer from the release to NVFP4 on one GPU: `dsv4 calibrate` then
`dsv4 convert RELEASE --amax`, timed, with the projection to the whole model.

    python bench/layer_bench.py [--samples 128] [--seq-len 512] [--batch 4] [--device cuda]
                                [--recipe experts] [--steps calibrate,convert,transcode]
                                [--shard-gib 4] [--workdir DIR] [--keep]

Builds, on this machine, a release-format checkpoint of V4 Pro cut to one decoder layer
(harness.byte_mix.full_layer_config: compress ratio 4, so attention with its compressor and indexer;
all 384 routed experts; 128 heads; the whole vocabulary), every tensor with its header-true dtype and
shape and random bytes of the release's forms (about 12.9 GiB for the layer, 3.5 GiB for embedding and
head). The values are scaled to weights of about 0.02 so that the forward stays finite; routing on
random weights is not a trained model's, so the experts' token counts differ from a real run's.

Then, each in a child process (its own peak RSS; the step's own report for the rest):

* ``calibrate``: `dsv4 calibrate` with --samples x --seq-len tokens on --device; prints the layer's
  seconds split into read, dequantize, forward (calibration) and write, and peak GPU memory;
* ``convert``: `dsv4 convert RELEASE DST --amax AMAX` (experts requantized with the calibrated amax);
* ``transcode``: the same with --experts transcode.

Each convert is printed beside `cp` of the files it reads and of the files it writes, measured in the
same run. Finally the projection for V4 Pro (61 decoder layers, the MTP block not calibrated, as
whole-model calibration does not) on one GPU of this kind, at the disk speeds listed. Nothing is
asserted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from stepbench import (
    _status_kib,
    disk,
    gb,
    machine,
    random_tensor,
    reference_config,
    shards,
    sync,
    timed_cp,
    warm,
    write_shards,
)

from harness.byte_mix import GIB, bench_config, full_layer_config, nbytes, release_specs

STEPS = ("calibrate", "convert", "transcode")
DISK_GBPS = (1.0, 2.0, 4.0)  # node disk speeds the projection is printed for
# UE8M0 scale bytes of the built release: 2^(b-127). E2M1 codes reach 6 and FP8 ~N(0, 100) values reach
# 448, so 2^-7 and 2^-12 give weights of about 0.02, as a trained model's.
MXFP4_SCALE_BYTES = (119, 122)
FP8_SCALE_BYTES = (114, 117)


def layer_release(out: Path, config: dict, shard_bytes: int, seed: int = 0) -> list[Path]:
    import torch

    gen = torch.Generator().manual_seed(seed)

    def make(key: str, dtype: str, shape: tuple[int, ...]):
        if dtype == "F8_E8M0":
            lo, hi = MXFP4_SCALE_BYTES if ".experts." in key else FP8_SCALE_BYTES
            return torch.randint(lo, hi, shape, generator=gen, dtype=torch.uint8).view(torch.float8_e8m0fnu)
        return random_tensor(key, dtype, shape, gen)

    paths = write_shards(out, release_specs(config), make, shard_bytes)
    (out / "config.json").write_text(json.dumps(config, indent=4))
    return paths


# ---- the child: one step in its own interpreter ------------------------------------------------------


def child(spec: dict) -> dict:
    base = _status_kib("VmRSS")
    start = time.perf_counter()
    out: dict = {}
    if spec["step"] == "calibrate":
        from dataclasses import asdict

        from pipeline.calibrate import CalibrateOptions, calibrate_release

        opts = CalibrateOptions(
            recipe=spec["recipe"],
            samples=spec["samples"],
            seq_len=spec["seq_len"],
            batch=spec["batch"],
            device=spec["device"],
            progress=False,
        )
        report = calibrate_release(Path(spec["release"]), Path(spec["amax"]), opts)
        out["report"] = asdict(report)
    else:
        from pipeline.convert import convert_checkpoint

        experts = "transcode" if spec["step"] == "transcode" else "requantize"
        result = convert_checkpoint(
            Path(spec["release"]),
            Path(spec["dst"]),
            amax=Path(spec["amax"]),
            experts=experts,
            recipe=spec["recipe"],
            device=spec["device"],
            progress=False,
        )
        sync(shards(Path(spec["dst"])))
        out.update(read=result.read_bytes, written=result.written_bytes)
    out.update(seconds=time.perf_counter() - start, base_kib=base, peak_kib=_status_kib("VmHWM"))
    return out


def run_child(spec: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, check=False
    )
    if proc.returncode:
        raise SystemExit(f"{spec['step']} failed:\n{proc.stdout[-4000:]}{proc.stderr[-4000:]}")
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


# ---- the run -----------------------------------------------------------------------------------------


def print_calibration(res: dict, layers_total: int, layer_bytes: int) -> None:
    report = res["report"]
    layer = report["layers"][-1]
    split = {k: layer[k] for k in ("read_s", "dequantize_s", "forward_s", "write_s")}
    per_layer = sum(split.values())
    peak = report.get("peak_device_bytes")
    print(
        f"calibrate: {res['seconds']:.1f} s in all (capture {report['capture_s']:.1f} s, the rest model set-up); "
        f"{report['amax_keys']} amax; peak GPU memory "
        + (f"{peak / GIB:.1f} GiB" if peak else "n/a (not CUDA)")
        + f"; peak RSS {gb(res['peak_kib'] * 1024)} GB"
    )
    print("  one layer: " + ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in split.items()))
    print(
        f"  read {layer_bytes / 1e9:.1f} GB from the page cache: {layer_bytes / split['read_s'] / 1e9:.2f} GB/s"
    )
    compute = per_layer - split["read_s"]
    print(f"projected calibration of V4 Pro ({layers_total} decoder layers) on one GPU of this kind:")
    for gbps in DISK_GBPS:
        read = layer_bytes / (gbps * 1e9)
        serial = layers_total * (compute + read) + report["capture_s"]
        overlapped = layers_total * max(compute, read) + report["capture_s"]
        print(
            f"  disk {gbps:.0f} GB/s: {serial / 60:5.1f} min with reads in turn, "
            f"{overlapped / 60:5.1f} min with the next layer read during this one"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", default=",".join(STEPS), help="comma-separated, of " + ", ".join(STEPS))
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--recipe", default="experts", choices=("experts", "full"))
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--shard-gib", type=float, default=4.0, help="largest shard of the built release")
    parser.add_argument(
        "--gib",
        type=float,
        default=None,
        help="instead of the full-size layer, stepbench's one-layer checkpoint of about GIB GiB with V4 Pro's "
        "byte mix (fewer experts and heads): a smoke test of this script on a small machine",
    )
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the built release and outputs")
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.steps.split(",") if s.strip()]
    if unknown := set(chosen) - set(STEPS):
        parser.error(f"unknown step(s) {sorted(unknown)}; known: {', '.join(STEPS)}")
    reference = reference_config()
    config = full_layer_config(reference) if args.gib is None else bench_config(reference, args.gib)
    layer_bytes = sum(nbytes(d, s) for k, d, s in release_specs(config) if k.startswith("layers.0."))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="dsv4-layer-"))
    work.mkdir(parents=True, exist_ok=True)
    release, amax = work / "release", work / "amax.safetensors"
    print(f"machine: {machine()}; workdir {work} on {disk(work)}")
    try:
        start = time.perf_counter()
        layer_release(release, config, int(args.shard_gib * GIB))
        sync(shards(release))
        total = sum(p.stat().st_size for p in shards(release))
        print(
            f"built a one-layer V4 Pro release: {total / GIB:.2f} GiB ({layer_bytes / GIB:.2f} GiB the decoder "
            f"layer) in {time.perf_counter() - start:.0f} s"
        )
        common = dict(release=str(release), amax=str(amax), recipe=args.recipe, device=args.device)
        if "calibrate" in chosen:
            warm(shards(release))
            spec = dict(
                common, step="calibrate", samples=args.samples, seq_len=args.seq_len, batch=args.batch
            )
            res = run_child(spec)
            print_calibration(res, reference["num_hidden_layers"], layer_bytes)
        for step in [s for s in chosen if s != "calibrate"]:
            if not amax.is_file():
                raise SystemExit(f"{step}: no {amax}; run the calibrate step first")
            dst = work / f"out-{step}"
            shutil.rmtree(dst, ignore_errors=True)
            cp_in = timed_cp(shards(release), work / "cp-in")
            warm(shards(release))
            res = run_child(dict(common, step=step, dst=str(dst)))
            cp_out = timed_cp(shards(dst), work / "cp-out")
            s = res["seconds"]
            print(
                f"convert --amax{' --experts transcode' if step == 'transcode' else ''}: {s:.1f} s, read "
                f"{gb(res['read'])} GB ({res['read'] / s / 1e9:.2f} GB/s), wrote {gb(res['written'])} GB; "
                f"vs cp of the input {cp_in / s:.2f}, of the output {cp_out / s:.2f}; "
                f"peak RSS {gb(res['peak_kib'] * 1024)} GB"
            )
            release_gb = sum(nbytes(d, sh) for _, d, sh in release_specs(reference)) / 1e9
            for gbps in DISK_GBPS:
                # the step at the ratio measured here against cp, cp at the disk's speed
                print(
                    f"  V4 Pro ({release_gb:.0f} GB read) at {gbps:.0f} GB/s of cp: "
                    f"{release_gb / gbps / (cp_in / s) / 60:.1f} min"
                )
            if not args.keep:
                shutil.rmtree(dst, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(child(json.loads(sys.argv[2]))))
        sys.exit(0)
    sys.exit(main())
