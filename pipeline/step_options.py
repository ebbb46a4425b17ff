"""The defaults every streaming step (dequant, convert, slice) shares, in one place: the steps' plan
functions take them as their defaults, and the command line (pipeline/cli/options.py) shows them.
Torch-free, so that `dsv4 --help` can read them."""

from __future__ import annotations

import os

DEFAULT_SHARD_GIB = 5.0
DEFAULT_SHARD_BYTES = int(DEFAULT_SHARD_GIB * 1024**3)  # a size the hub and vLLM's loader handle well


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's or taskset's share, not the
    machine's count), the default number of converter threads a step runs."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


# On a CUDA device, the threads feeding the GPU, beside the CPU converter threads
# (pipeline.checkpoint.producer.Converters). From bench/stepbench.py --gpu-workers 2,4,16 on a lent
# 16-core H100 machine, when these were a share of 16 threads: 2 and 4 alike, 16 the slowest
# (docs/benchmarks.md). As threads of their own, 4 was measured (convert --amax 14-24 % faster than
# the CPU threads alone on that machine); other counts have not been measured since.
DEFAULT_GPU_WORKERS = 4


# How far a step's converters may run ahead of its writer, in bytes of tensors started and not yet
# written: enough to keep every converter busy while the writer works through a large tensor, small
# enough that peak memory stays near one tensor per converter plus this, far below a 5 GiB shard.
AHEAD_BYTES_MAX = 1024**3


def default_ahead_bytes() -> int:
    """AHEAD_BYTES_MAX, or an eighth of the machine's RAM where that is less."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return AHEAD_BYTES_MAX
    return max(64 * 1024**2, min(AHEAD_BYTES_MAX, ram // 8))
