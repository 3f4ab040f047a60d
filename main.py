#!/usr/bin/env python
"""Train an asymmetric decoder: `python main.py --base configs/asym_base.yaml -t --gpus 0,1,2,3`.

See `python main.py --help` and ldm_asym/cli.py.
"""

import sys

from ldm_asym.cli import run

if __name__ == "__main__":
    sys.exit(run())
