"""The diffusers pipelines `edit` drives, and what differs between them.

Each pipeline runs once to latents (`output_type="latent"`); this module turns those into the
unscaled latent both decoders take, and gives our decoder the image and mask exactly as the
pipeline itself used them (1 = hole, binary, B x 1 x H x W; image in [-1, 1]):

* SD 1.x/2.x and SDXL inpainting (inpaint): image and mask from the pipeline's own `image_processor`
  and `mask_processor`; latents B x 4 x h x w.
* FLUX.1 Fill (inpaint): the same processors (multiples of 16); latents come packed as 2x2 patches
  (B x h/2*w/2 x 64) and are unpacked with the pipeline's own `_unpack_latents`; 16 channels.
* Paint-by-Example (example): image from `image_processor`; the mask from the pipeline's own
  `prepare_mask_and_masked_image`, which returns **1 = keep**, inverted back to 1 = hole.
* SD 1.x/2.x, SDXL, FLUX.1 text-to-image (t2i): no image or mask (see `t2i_condition`).

Unscaling always reads the pipeline VAE's config: `latents_mean` / `latents_std` when both are set
(as SDXL pipelines do), else `latents / scaling_factor + shift_factor` (shift 0 when absent: SD;
FLUX and SD3 set it). Nothing is hard-coded per family.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass

import torch

TASKS = ("inpaint", "example", "t2i")


@dataclass(frozen=True)
class Family:
    name: str  # for messages
    task: str  # one of TASKS
    upcast_fp16_vae: bool = False  # the pipeline decodes in fp32 when its fp16 VAE says `force_upcast` (SDXL)


# Pipeline class name -> family. Subclasses are matched through their bases.
FAMILIES = {
    "StableDiffusionInpaintPipeline": Family("SD 1.x/2.x inpainting", "inpaint"),
    "StableDiffusionXLInpaintPipeline": Family("SDXL inpainting", "inpaint", upcast_fp16_vae=True),
    "FluxFillPipeline": Family("FLUX.1 Fill", "inpaint"),
    "PaintByExamplePipeline": Family("Paint-by-Example", "example"),
    "StableDiffusionPipeline": Family("SD 1.x/2.x text-to-image", "t2i"),
    "StableDiffusionXLPipeline": Family("SDXL text-to-image", "t2i", upcast_fp16_vae=True),
    "FluxPipeline": Family("FLUX.1 text-to-image", "t2i"),
}

# Pipeline call keyword -> the command-line flag that sets it (for "does not take" errors).
FLAGS = {"prompt": "--prompt", "negative_prompt": "--negative-prompt", "strength": "--strength",
         "guidance_scale": "--guidance-scale", "num_inference_steps": "--steps", "example_image": "--example"}


def supported(task: str | None = None) -> str:
    return ", ".join(c for c, f in FAMILIES.items() if task in (None, f.task))


def family_of(pipe_or_name, task: str | None = None) -> Family:
    """The family of a pipeline (instance, class or class name); checks it fits `task` when given."""
    if isinstance(pipe_or_name, str):
        names = [pipe_or_name]
    else:
        cls = pipe_or_name if isinstance(pipe_or_name, type) else type(pipe_or_name)
        names = [c.__name__ for c in cls.__mro__]
    family = next((FAMILIES[n] for n in names if n in FAMILIES), None)
    if family is None:
        raise ValueError(f"unsupported pipeline {names[0]}; supported: {supported()}")
    if task is not None and family.task != task:
        raise ValueError(f"--task {task} needs one of {supported(task)}; {names[0]} is a {family.name} pipeline "
                         f"(--task {family.task})")
    return family


def size_multiple(pipe) -> int:
    """Image sides must be multiples of this (8; FLUX 16: its latents are packed in 2x2 patches)."""
    processor = getattr(pipe, "image_processor", None)
    return int(getattr(getattr(processor, "config", None), "vae_scale_factor", None) or pipe.vae_scale_factor)


def default_size(pipe) -> int:
    """The side a text-to-image pipeline generates when not told (SD 512/768, SDXL 1024, FLUX 1024)."""
    sample = getattr(pipe, "default_sample_size", None) or pipe.unet.config.sample_size
    return int(sample) * pipe.vae_scale_factor


# ---------------------------------------------------------------------- running
def run(pipe, family: Family, prep, *, prompt: str | None = None, negative_prompt: str | None = None,
        seed: int = 0, steps: int | None = None, guidance_scale: float | None = None,
        strength: float | None = None, num_images: int = 1, **extra) -> torch.Tensor:
    """One diffusion run -> the latents the pipeline would decode (as it returns them, packed for FLUX).

    Arguments left at None take the pipeline's own default (guidance: SD 7.5, Paint-by-Example 5,
    FLUX Fill 30, FLUX 3.5). `extra` goes to the pipeline as is (e.g. `prompt_embeds`).
    """
    width, height = prep.work_size
    # A CPU generator gives the same noise on every device.
    kwargs = dict(height=height, width=width, num_inference_steps=steps, guidance_scale=guidance_scale,
                  strength=strength, negative_prompt=negative_prompt, num_images_per_prompt=num_images,
                  generator=torch.Generator("cpu").manual_seed(seed), output_type="latent", **extra)
    if family.task == "example":
        # Paint-by-Example takes the mask as users draw it (white = repaint) and inverts it itself
        # (`prepare_mask_and_masked_image`: "paint-by-example inverses the mask"); `condition` below
        # inverts its result back for our decoder.
        kwargs.update(image=prep.image, mask_image=prep.mask, example_image=prep.example, prompt=prompt)
    else:
        if prompt is None and "prompt_embeds" not in extra:
            prompt = ""
        kwargs["prompt"] = prompt
        if family.task == "inpaint":
            kwargs.update(image=prep.image, mask_image=prep.mask)
    params = inspect.signature(pipe.__call__).parameters
    refused = [k for k, v in kwargs.items() if v is not None and k not in params]
    if refused:
        raise ValueError(f"{type(pipe).__name__} ({family.name}) does not take "
                         + ", ".join(FLAGS.get(k, k) for k in refused))
    return pipe(**{k: v for k, v in kwargs.items() if v is not None}).images


def unscale(latents: torch.Tensor, vae_config) -> torch.Tensor:
    """Diffusion-space latents -> what `vae.decode` takes, from the VAE config alone (as the pipelines do)."""
    scale = vae_config["scaling_factor"]
    mean, std = vae_config.get("latents_mean"), vae_config.get("latents_std")
    if mean is not None and std is not None:  # SDXL pipelines' per-channel normalisation
        mean, std = (torch.tensor(v).view(1, -1, 1, 1).to(latents.device, latents.dtype) for v in (mean, std))
        return latents * std / scale + mean
    return latents / scale + (vae_config.get("shift_factor") or 0.0)


def to_z(pipe, latents: torch.Tensor, prep) -> torch.Tensor:
    """The pipeline's latent output -> unscaled B x C x h x w latents for both decoders."""
    if latents.ndim == 3:  # FLUX: B x (h/2 * w/2) x 4C tokens of 2x2 latent patches
        unpack = getattr(pipe, "_unpack_latents", None)
        if unpack is None:
            raise ValueError(f"{type(pipe).__name__} returned packed latents {tuple(latents.shape)} and has no "
                             f"_unpack_latents")
        width, height = prep.work_size
        latents = unpack(latents, height, width, pipe.vae_scale_factor)
    return unscale(latents, pipe.vae.config)


def condition(pipe, family: Family, prep) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(image 1 x 3 x H x W in [-1, 1], mask 1 x 1 x H x W, 1 = hole) as the pipeline saw them; None for t2i."""
    if family.task == "t2i":
        return None
    width, height = prep.work_size
    image = pipe.image_processor.preprocess(prep.image, height=height, width=width)
    if family.task == "example":
        # The pipeline's own mask preparation (binarised as it binarises), taken from the pipeline's
        # module, returns 1 = KEEP: `mask = 1 - mask` there. Ours is 1 = hole, so invert it back.
        prepare_pbe = sys.modules[type(pipe).__module__].prepare_mask_and_masked_image
        keep, _ = prepare_pbe(prep.image, prep.mask)
        mask = 1 - keep
    else:
        mask = pipe.mask_processor.preprocess(prep.mask, height=height, width=width)
    return image, mask


def t2i_condition(asym, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Text-to-image has no known pixels: our decoder runs as a plain decoder.

    Which path: with the paper's additive blend (`h * m + f * (1 - m)`) an all-ones mask is the
    identity, so the plain path (no image, no mask; DESIGN §5) gives exactly the same result without
    running the branch: we use it (also for `blend: none`). The concat ablation's 1x1 blend conv is
    *not* the identity at m = 1, and training showed it the all-ones mask (the no-prior half of
    each batch, DESIGN §4), never the plain path, so it gets an all-ones mask and a zero image
    (its content does not matter: the branch sees `(1 - mask) * image = 0`).
    """
    if asym.blend != "concat":
        return None
    b, _, h, w = z.shape
    f = asym.downsample_factor
    return z.new_zeros(b, 3, h * f, w * f), z.new_ones(b, 1, h * f, w * f)
