#!/usr/bin/env python
"""Our asymmetric decoder vs diffusers' AsymmetricAutoencoderKL (same weights), side by side.

    python scripts/benchmark.py --variant tiny base --size 256 --batch 1 --json bench.json
    python scripts/benchmark.py --variant base --device cuda --dtype bf16 --channels-last --compile
    python scripts/benchmark.py --data-only --data            # data loading on generated JPEGs

Decode latency (image + mask), full training step (images/s), peak memory, output difference to
the fp32 reference; see ldm_asym/benchmark.py and docs/benchmarks.md.
"""

import sys

from ldm_asym.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
