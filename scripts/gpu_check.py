#!/usr/bin/env python
"""One command for one CUDA GPU: CUDA tests, training and decode throughput, one JSON + one table.

    python scripts/gpu_check.py --out gpu_check_out        # on the GPU (about 6 minutes)
    python scripts/gpu_check.py --smoke --out /tmp/gc      # CPU rehearsal at toy sizes (CI)

Writes OUT/gpu_check.json and OUT/gpu_check.md; exits 1 if any section failed. Sections, sizes and
targets: benchmarks/gpu_check.py; how to run it on the GPU machine: docs/benchmarks.md.
"""

import sys
from pathlib import Path

# benchmarks/ and ldm_asym/ from this checkout (the GPU machine has no installed copy of either).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_check import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
