"""One entry point for the paper's tasks: a diffusers pipeline's latents, decoded by its VAE and by ours.

Tasks (`scripts/edit.py --task`, or auto from the pipeline's class):
* inpaint: SD 1.x/2.x inpainting, SDXL inpainting, FLUX.1 Fill (text-guided, image + mask);
* example: Paint-by-Example (image + mask + an example image, no text);
* t2i: SD 1.x/2.x, SDXL, FLUX.1 text-to-image (no image, no mask: our decoder as a plain decoder).

The diffusion runs **once** (`output_type="latent"`); the same latents are then decoded by the
pipeline's VAE ("vanilla") and by our `AsymmetricAutoencoder` ("asym") given the image and mask
exactly as the pipeline prepared them, so the decoder is the only difference between the results.
`pipelines` holds what differs per pipeline (mask conventions, packed latents, unscaling from
the VAE config), `io` the files, `core` loading and decoding, `cli` the command line.

Why not simply set `pipe.vae = asym` and let the pipeline decode? diffusers 0.42.1 does call
`vae.decode(latents / scaling_factor, generator=..., image=init_image, mask=mask_condition)` for an
`AsymmetricAutoencoderKL` in its SD 1.x/2.x inpainting pipelines only (not SDXL, FLUX or Paint-by-Example),
but `init_image` / `mask_condition` keep one row per prompt while the latents have
`num_images_per_prompt` rows, and `MaskConditionDecoder` looks its branch features up by full shape,
batch included: `num_images_per_prompt > 1` raises `KeyError: '(2, 64, 9, 11)'`. The diffusers class
also has no `shift_factor` (FLUX) and no concat blend. Two runs (one per VAE) would double the
diffusion cost and give the same latents only if both encoders were identical.
"""

from ldm_asym.editing.core import (check_encoder, decode, edit, load_asym, load_pipeline, pick_device, pick_dtype,
                                   pipeline_class_name, pipeline_folder)
from ldm_asym.editing.io import (Prepared, comparison, known_pixel_error, prepare, prepare_size, read_image,
                                 read_mask, save_results)
from ldm_asym.editing.pipelines import FAMILIES, TASKS, family_of, size_multiple

__all__ = ["FAMILIES", "TASKS", "Prepared", "check_encoder", "comparison", "decode", "edit", "family_of",
           "known_pixel_error", "load_asym", "load_pipeline", "pick_device", "pick_dtype", "pipeline_class_name",
           "pipeline_folder", "prepare", "prepare_size", "read_image", "read_mask", "save_results", "size_multiple"]
