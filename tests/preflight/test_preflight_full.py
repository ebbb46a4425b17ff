"""The node's preflight (harness/preflight.py) at full scale: the real V4 Pro's disk, RAM and GPU plan of
both paths, from the sparse replica of the release (tests/preflight/test_preflight.py has the rest, on
fakes). The numbers asserted here are the ones docs/preflight.md quotes."""

from __future__ import annotations

import math
import sys

import pytest

from harness import preflight as P
from pipeline.checkpoint import Checkpoint
from pipeline.checkpoint.dtypes import itemsize
from pipeline.dequant import plan_dequant
from tests.preflight import test_node_preflight as node_tests

pytestmark = pytest.mark.slow  # full scale: the 145,116-key replica

GIB = 1024**3


def test_disk_plan_of_v4_pro(release_replica):
    plan = dict(P.disk_plan(release_replica))
    print("\n" + P.format_disk_plan(list(plan.items())))
    ckpt = Checkpoint.open(release_replica)
    dequant = plan_dequant(ckpt).output
    assert plan[P.STEP_BF16] == dequant.total_bytes == 3_197_877_143_816  # 3.2 TB
    assert P.bf16_bytes(ckpt.config) == dequant.tensor_bytes
    assert plan[P.STEP_CONVERTED] == 913_854_218_360  # NVFP4 experts, the release's FP8 attention, MTP
    assert plan[P.STEP_EXPORT] == 921_804_134_284  # NVFP4 experts, BF16 attention, no MTP (estimate)
    assert plan[P.STEP_CANARY] == 26_969_083_700  # 2 layers x 8 experts: slice, BF16, export, converted
    # the seeds' node: 8 B200s, 2.7 TB RAM, 13 TB NVMe
    assert P.check_disk(list(plan.items()), 13 * 10**12) == []
    assert P.check_disk(list(plan.items()), 4 * 10**12) != []
    need = P.ram_needed(plan[P.STEP_BF16], 8 * 179 * GIB)
    assert need == 2_258_997_292_911  # the BF16 model less 70 % of 8 x 179 GiB, plus 128 GiB
    assert P.check_ram(2_700_000_000_000, need) == [] and P.check_ram(2_000_000_000_000, need) != []


def test_one_gpu_disk_plan_of_v4_pro(release_replica):
    """The one-GPU path writes about 1 TB beyond the release (the BF16 path: 5 TB, above)."""
    plan = dict(P.one_gpu_disk_plan(release_replica))
    bf16_plan = dict(P.disk_plan(release_replica))
    print("\none-GPU path:\n" + P.format_disk_plan(list(plan.items())))
    print("BF16 path:\n" + P.format_disk_plan(list(bf16_plan.items())))
    config = Checkpoint.open(release_replica).config
    # the work folder: two sets of [128 samples, 512 tokens, hc 4, hidden 7168] BF16 (3.5 GiB each) + amax
    assert P.activation_bytes(config, 128, 512) == 128 * 512 * 4 * 7168 * 2 == int(3.5 * GIB)
    assert (
        P.amax_bytes(config) == 36_979_712
    )  # a bound: a weight and an input amax for each of 72,226 linear weights, 256 bytes each
    assert plan[P.STEP_CALIBRATE] == 2 * int(3.5 * GIB) + 2 * 36_979_712 == 7_590_152_192
    # the same layout as --graft-from's, so the same bytes
    assert plan[P.STEP_CONVERTED_AMAX] == bf16_plan[P.STEP_CONVERTED] == 913_854_218_360
    assert plan[P.STEP_CANARY_ONE_GPU] == 11_845_093_600  # slice, its work folder at 16 x 64, converted
    total = sum(plan.values())
    assert total == 933_289_464_152 < 1.1e12  # "about 1 TB beyond the release, not 5 TB"
    assert sum(bf16_plan.values()) > 5 * total
    # the seeds' node (13 TB NVMe) has room for both; a 1 TB filesystem for the one-GPU path only
    assert P.check_disk(list(plan.items()), 10**12) == []
    assert P.check_disk(list(bf16_plan.items()), 10**12) != []
    assert P.check_disk(list(plan.items()), 900 * 10**9) != []


def test_one_gpu_memory_of_v4_pro(release_replica):
    """One GPU with ~62 GiB free calibrates V4 Pro at 128 x 512 tokens; the host needs ~49 GiB."""
    ckpt = Checkpoint.open(release_replica)
    config = ckpt.config
    blocks = {b.block: b for b in P.block_bytes(config)}
    assert len(blocks) == 62  # 61 decoder layers and the MTP block
    # the table's bytes are the replica's headers, block by block (the release is what calibrate reads)
    for name in ("layers.0", "layers.4", "layers.60", "mtp.0"):
        stored = sum(
            math.prod(t.shape) * itemsize(t.dtype)
            for k, t in ckpt.tensors.items()
            if k.startswith(name + ".")
        )
        assert blocks[name].release == stored, name
    # a CSA layer (with its indexer): 12.9 GiB in the release, 48.0 GiB in BF16 (issue 16's numbers)
    assert (blocks["layers.4"].release, blocks["layers.4"].bf16) == (13_903_542_296, 51_540_057_560)
    gpu = dict(P.one_gpu_calibration_memory(config))
    print("\ndsv4 calibrate, GPU:\n" + P.format_memory(list(gpu.items())))
    assert gpu["largest block in BF16 (mtp.0)"] == 51_683_274_988  # the MTP block: a layer + e_proj, h_proj
    assert gpu["embedding in BF16, on the device for the run"] == 129_280 * 7168 * 2
    need = P.one_gpu_calibration_bytes(config)
    assert need == 66_052_436_204  # 61.5 GiB
    b200, h200, h100 = (
        P.GpuInfo(0, name, cap, total * GIB, total * GIB - GIB)
        for name, cap, total in (("B200", (10, 0), 179), ("H200", (9, 0), 139), ("H100", (9, 0), 79))
    )
    assert P.check_calibration_gpu([b200], need) == P.check_calibration_gpu([h200], need) == []
    assert P.check_calibration_gpu([h100], need) == []  # 78 of 79 GiB free: fits at 128 x 512
    assert P.check_calibration_gpu([h100], P.one_gpu_calibration_bytes(config, 512, 512)) != []
    ram = dict(P.one_gpu_ram_memory(config))
    print("host RAM:\n" + P.format_memory(list(ram.items())))
    need_ram = P.one_gpu_ram_bytes(config)
    assert need_ram == 52_609_237_336  # 49.0 GiB
    bf16_ram = P.ram_needed(dict(P.disk_plan(release_replica))[P.STEP_BF16], 8 * 179 * GIB)
    assert need_ram * 40 < bf16_ram  # 2.26 TB on the BF16 path
    assert P.check_ram(64 * GIB, need_ram, P.PATH_ONE_GPU) == []
    assert P.check_ram(32 * GIB, need_ram, P.PATH_ONE_GPU) != []


def test_b200_source_validation_on_the_replica(release_replica):
    node_tests.test_source_headers(release_replica)


# moved from tests/preflight/test_preflight.py: it runs subprocesses with timeouts (seconds)
def test_run_step_logs_and_reports_exit_status_and_timeouts(tmp_path):
    ok = P.run_step(P.CanaryStep("ok", [sys.executable, "-c", "print('hello')"], 60), tmp_path)
    assert ok.ok and ok.tail.endswith("hello") and ok.log.read_text().startswith("$ ")
    bad = P.run_step(P.CanaryStep("bad", [sys.executable, "-c", "raise SystemExit(3)"], 60), tmp_path)
    assert bad.returncode == 3 and not bad.ok
    slow = P.run_step(
        P.CanaryStep("slow", [sys.executable, "-c", "import time; time.sleep(30)"], 0.5), tmp_path
    )
    assert slow.returncode == -1 and slow.seconds < 10 and "KeyboardInterrupt" in slow.tail  # SIGINT first
    stubborn = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(30)"
    killed = P.run_step(P.CanaryStep("stubborn", [sys.executable, "-c", stubborn], 0.5), tmp_path, grace=0.5)
    assert killed.returncode == -1 and killed.seconds < 10
