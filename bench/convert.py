"""`dsv4 convert` throughput against `cp` of its input and of its output bytes, with peak RSS, in one run.

    python bench/convert.py [--recipe experts|full|transcode|experts,full,transcode] [--gib 2]
                            [--shard-gib 1] [--workers N] [--device cpu|cuda] [--workdir DIR] [--keep]

bench/stepbench.py with --steps experts,full,transcode (--recipe picks some): a synthetic ModelOpt 0.47
NVFP4 export (dialect X) per recipe, of V4 Pro's shapes and a byte mix sized on V4 Pro's (printed beside
it), converted in a child process; transcode converts the experts export with --graft-from a matching
release checkpoint and --experts transcode. Nothing is asserted.
"""

import sys

from stepbench import main

if __name__ == "__main__":
    sys.exit(main(steps=("experts", "full", "transcode"), doc=__doc__))
