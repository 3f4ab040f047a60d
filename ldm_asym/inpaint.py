"""Old home of the inpainting helpers; they live in `ldm_asym.editing` now (scripts/edit.py)."""

from ldm_asym.editing.core import check_encoder, edit, load_asym, load_pipeline, pick_device, pick_dtype  # noqa: F401
from ldm_asym.editing.io import (Prepared, comparison, known_pixel_error, prepare, read_image,  # noqa: F401
                                 read_mask, save_results)
