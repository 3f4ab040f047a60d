#!/usr/bin/env python
"""`scripts/edit.py --task inpaint`: text-guided inpainting (SD 1.x/2.x, SDXL, FLUX.1 Fill pipelines),
decoded by the pipeline's VAE and by our asymmetric decoder. Kept for existing commands;
`--help` for the options."""

import sys

from ldm_asym.editing.cli import main as _main


def main(argv=None) -> int:
    return _main(argv, prog="inpaint.py", task="inpaint")


if __name__ == "__main__":
    sys.exit(main())
