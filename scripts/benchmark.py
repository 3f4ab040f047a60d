#!/usr/bin/env python
"""Our asymmetric decoder vs diffusers' AsymmetricAutoencoderKL (same weights), side by side.

    python scripts/benchmark.py --variant tiny base --size 256 --batch 1 --json bench.json
    python scripts/benchmark.py --variant base --device cuda --dtype bf16 --channels-last --compile
    python scripts/benchmark.py --data-only --data            # data loading on generated JPEGs

Decode latency (image + mask), full training step (images/s), peak memory, output difference to
the fp32 reference; see benchmarks/harness.py and docs/benchmarks.md.
"""

import sys
from pathlib import Path

# benchmarks/ lives beside ldm_asym but is not installed with it: import it from this checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
