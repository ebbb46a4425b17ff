#!/usr/bin/env bash
# The GPU tier: what a CPU cannot check (the tests marked gpu) plus GPU throughput, repeatable on any CUDA machine.
#
#   bench/gpu_tier.sh pack [MODELOPT_CHECKOUT]
#                                 on a machine with pip access: download the wheels the GPU machine may
#                                 lack (ModelOpt 0.47 and transformers 5.23 with their small deps) into
#                                 .whl/, and copy examples/hf_ptq/*.py of a Model-Optimizer checkout into
#                                 .carry/ (keep .whl/ and .carry/ out of git: .git/info/exclude)
#   bench/gpu_tier.sh run [OUT [PART...]]
#                                 on the GPU machine, from the repo root: install .whl/ into a private
#                                 site dir if present, run `pytest -m gpu` (hf_ptq end to end when .carry/
#                                 has the checkout), then bench/formats.py, bench/dequant.py and
#                                 bench/convert.py (experts, full, transcode) on CUDA and CPU, each with
#                                 cp and peak RSS beside it; results go to OUT (default: $OUT or
#                                 gpu-tier-out); PARTS: tests formats dequant convert (default: these),
#                                 layer (bench/layer_bench.py: one full-size V4 Pro layer calibrated and
#                                 converted on the GPU, ~17 GiB of disk), steps (bench/stepbench.py: dequant,
#                                 convert experts/full/transcode and convert --amax, CUDA and CPU in one
#                                 run; STEPBENCH_ARGS, default "--gib 3 --repeat 2"; add e.g.
#                                 "--gpu-workers 2,4,8" for a cuda row per GPU thread count), bytes (only the
#                                 CUDA == CPU byte tests of tests/device/test_cuda_paths.py: no ModelOpt
#                                 needed, ~20 s)
#
# Targets Python 3.12 (the wheels are cp312 where it matters). Nothing here is asserted on timings.
set -euo pipefail
cd "$(dirname "$0")/.."

# hypothesis (+ sortedcontainers): `pytest -m gpu` collects every test module, and some import it
WHEELS=(
  nvidia-modelopt==0.47.0 transformers==5.23.0 omegaconf==2.4.0 pulp==3.3.2
  pydantic==2.14.3 pydantic-core==2.50.4 annotated-types typing-inspection syrupy==7.0.1
  hypothesis==6.170.15 sortedcontainers==2.4.0
)

pack() {
  mkdir -p .whl
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
  if [[ -n "${1:-}" ]]; then  # the hf_ptq example files only: the wheel ships none
    mkdir -p .carry/Model-Optimizer/examples/hf_ptq
    cp "$1"/examples/hf_ptq/*.py .carry/Model-Optimizer/examples/hf_ptq/
    du -sh .carry
  fi
  du -sh .whl
}

run() {
  local out=${1:-${OUT:-gpu-tier-out}}
  local parts=" ${*:2} "
  [[ "$parts" == "  " ]] && parts=" tests formats dequant convert "
  mkdir -p "$out"
  if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dsv4-site .whl/*.whl
    export PYTHONPATH=/tmp/dsv4-site
  fi
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
  { date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__)'; } | tee "$out/machine.txt"
  if [[ -f .carry/Model-Optimizer/examples/hf_ptq/hf_ptq.py ]]; then
    export DSV4_MODELOPT_REPO=$PWD/.carry/Model-Optimizer
  fi
  # DSV4_REQUIRE: on this machine a missing CUDA or ModelOpt is an error, not a skip
  if [[ "$parts" == *" tests "* ]]; then
    DSV4_REQUIRE=gpu,quant python3 -m pytest -m gpu -p no:cacheprovider -q -rs -s \
      --junitxml "$out/gpu-tests.xml" 2>&1 | tee "$out/gpu-tests.log"
  fi
  if [[ "$parts" == *" bytes "* ]]; then  # every format function, dequant, convert and --amax: CUDA's bytes are the CPU's
    DSV4_REQUIRE=gpu python3 -m pytest -m gpu tests/device/test_cuda_paths.py -p no:cacheprovider -q -rs \
      -k "cuda_gives or writes_the_cpu_bytes" 2>&1 | tee "$out/gpu-bytes.log"
  fi
  if [[ "$parts" == *" layer "* ]]; then  # one full-size V4 Pro layer: calibrate and convert --amax (issue 16)
    python3 bench/layer_bench.py --device cuda 2>&1 | tee "$out/bench-layer-cuda.txt"
  fi
  if [[ "$parts" == *" steps "* ]]; then  # every streaming step, both devices in one bench run (issue 15)
    # both devices between the same cps (one disk state for the two rows); STEPBENCH_ARGS to change size
    # shell word splitting of STEPBENCH_ARGS is wanted here
    # shellcheck disable=SC2086
    python3 bench/stepbench.py --device cuda,cpu ${STEPBENCH_ARGS:---gib 3 --repeat 2} 2>&1 | tee "$out/bench-steps.txt"
  fi
  if [[ "$parts" == *" formats "* ]]; then
    python3 bench/formats.py --device cuda 2>&1 | tee "$out/bench-formats-cuda.txt"
  fi
  if [[ "$parts" == *" dequant "* ]]; then
    python3 bench/dequant.py --device cuda 2>&1 | tee "$out/bench-dequant-cuda.txt"
    python3 bench/dequant.py --device cpu 2>&1 | tee "$out/bench-dequant-cpu.txt"
  fi
  if [[ "$parts" == *" convert "* ]]; then
    for recipe in full experts transcode; do
      python3 bench/convert.py --recipe "$recipe" --device cuda 2>&1 | tee "$out/bench-convert-$recipe-cuda.txt"
      python3 bench/convert.py --recipe "$recipe" --device cpu 2>&1 | tee "$out/bench-convert-$recipe-cpu.txt"
    done
  fi
}

case "${1:-}" in
  pack) shift; pack "$@" ;;
  run) shift; run "$@" ;;
  *) sed -n '2,24p' "$0"; exit 2 ;;
esac
