"""The node's preflight (harness/preflight.py) at full scale: the real V4 Pro's disk and RAM plan, from
the sparse replica of the release (tests/preflight/test_preflight.py has the rest, on fakes)."""

from __future__ import annotations

import sys

import pytest

from harness import preflight as P
from pipeline.checkpoint import Checkpoint
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
