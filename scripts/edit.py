#!/usr/bin/env python
"""Edit with a diffusers pipeline (SD / SDXL inpainting, Paint-by-Example, FLUX.1 Fill, text-to-image)
and compare its VAE decoder with our asymmetric one. `--help` for the tasks and options;
the code is `ldm_asym.editing`."""

import sys

from ldm_asym.editing.cli import main

if __name__ == "__main__":
    sys.exit(main())
