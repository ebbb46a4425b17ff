"""`dsv4 dequant` throughput against `cp` of its input and of its output bytes, with peak RSS, in one run.

    python bench/dequant.py [--gib 2] [--shard-gib 1] [--workers N] [--device cpu|cuda] [--workdir DIR] [--keep]

bench/stepbench.py with --steps dequant: a release-format checkpoint of about --gib GiB whose byte mix
follows V4 Pro's release (printed beside it), dequantized to BF16 in a child process (dequant writes
about 3x what it reads: MXFP4 experts become BF16). Nothing is asserted.
"""

import sys

from stepbench import main

if __name__ == "__main__":
    sys.exit(main(steps=("dequant",), doc=__doc__))
