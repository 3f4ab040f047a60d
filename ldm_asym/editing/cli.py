"""Command line of scripts/edit.py (and scripts/inpaint.py, its alias with --task inpaint)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from ldm_asym.editing import core, io, pipelines

DESCRIPTION = """\
Edit with a diffusers pipeline and compare its VAE decoder with our asymmetric one.

The diffusion runs once; its latents are decoded by the pipeline's VAE and by our decoder (which
also sees the known pixels), so the decoder is the only difference. Writes OUT/NAME_vanilla_{k}.png,
OUT/NAME_asym_{k}.png and OUT/NAME_compare.png (one row per sample), at the input's original size,
and logs each result's known-pixel error.

Tasks (--task auto picks it from the pipeline's class):
  inpaint  SD 1.x/2.x, SDXL inpainting, FLUX.1 Fill: --image, --mask, --prompt
  example  Paint-by-Example: --image, --mask, --example (no prompt)
  t2i      SD 1.x/2.x, SDXL, FLUX.1 text-to-image: --prompt [--width --height]; our decoder runs
           as a plain decoder (no known pixels)

    python scripts/edit.py --pipeline sd-inpainting/ --ckpt logs/<run> --image photo.png \\
        --mask photo_mask.png --prompt "a red bench" --num-images 2 --out out/

Masks: white = hole, for every pipeline (Paint-by-Example's inverted internal convention is
handled here); grey, RGB, RGBA (transparent = known) or 16-bit; soft masks are binarised at 0.5 (as
the pipelines themselves do). Any image size: padded (--fit pad, default) or resized (--fit resize)
to the multiple the pipeline needs (8; FLUX 16), and brought back to the original size. Latent
scaling / shifting come from the pipeline VAE's config. Our checkpoint must share the pipeline
VAE's frozen encoder (e.g. a 16-channel decoder for FLUX).
"""


def parser(prog: str | None = None, task: str = "auto", description: str = DESCRIPTION) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", required=True, help="diffusers pipeline: local folder or Hub id")
    p.add_argument("--ckpt", required=True,
                   help="our decoder: diffusers AsymmetricAutoencoderKL folder, training checkpoint or run folder, "
                        "authors' checkpoint (anything load_autoencoder reads)")
    p.add_argument("--task", choices=("auto", *pipelines.TASKS), default=task,
                   help="what to run (default %(default)s: from the pipeline's class)")
    p.add_argument("--vae", default=None, help="take the frozen encoder from here (decoder-only checkpoints)")
    p.add_argument("--ema", action="store_true", help="use the EMA decoder weights of a training checkpoint")
    p.add_argument("--trust-pickle", action="store_true", help="allow pickles that run code (trusted files only)")
    p.add_argument("--image", default=None, help="input image (any size); inpaint / example")
    p.add_argument("--mask", default=None, help="mask image, white = hole; inpaint / example")
    p.add_argument("--example", default=None, help="Paint-by-Example's reference image")
    p.add_argument("--prompt", default=None, help="what to paint (inpaint) or generate (t2i)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--seed", type=int, default=0, help="seed of the (CPU) noise generator")
    p.add_argument("--steps", type=int, default=50, help="denoising steps")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance (<= 1: off); default: the pipeline's (SD 7.5, Paint-by-Example 5, "
                        "FLUX Fill 30, FLUX 3.5)")
    p.add_argument("--strength", type=float, default=None, help="inpainting strength; default: the pipeline's")
    p.add_argument("--num-images", type=int, default=1, help="samples per prompt")
    p.add_argument("--width", type=int, default=None, help="t2i: image width (default: the pipeline's)")
    p.add_argument("--height", type=int, default=None, help="t2i: image height (default: the pipeline's)")
    p.add_argument("--fit", choices=("pad", "resize"), default="pad",
                   help="reach the size multiple by mirror-padding (known pixels never resampled) or resizing")
    p.add_argument("--tile", type=int, default=None,
                   help="decode in tiles of this many latent pixels (x8 image pixels), for large images; both "
                        "decoders")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"),
                   help="auto: float16 on CUDA, float32 elsewhere")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--name", default=None, help="file name prefix (default: the image's file name stem, or 't2i')")
    return p


def check_task_inputs(args, task: str) -> None:
    """The inputs `task` needs, and none it would silently ignore."""
    editing = task != "t2i"
    missing = [f for f, v in (("--image", args.image), ("--mask", args.mask)) if editing and v is None]
    if task == "example" and args.example is None:
        missing.append("--example")
    if missing:
        raise ValueError(f"--task {task} needs {' and '.join(missing)}")
    unused = [f for f, v in (("--image", args.image), ("--mask", args.mask)) if v is not None and not editing]
    unused += ["--example"] if args.example is not None and task != "example" else []
    unused += [f for f, v in (("--width", args.width), ("--height", args.height)) if v is not None and editing]
    if unused:
        raise ValueError(f"--task {task} does not use {', '.join(unused)}")


def main(argv=None, *, prog: str | None = None, task: str = "auto", description: str = DESCRIPTION) -> int:
    args = parser(prog, task, description).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.num_images < 1:
            raise ValueError(f"--num-images must be at least 1; got {args.num_images}")
        if args.tile is not None and args.tile < 1:
            raise ValueError(f"--tile must be at least 1 latent pixel; got {args.tile}")
        # The inputs are checked first: a bad --image, --mask or --example must not wait for the models.
        if args.image is not None:
            io.read_image(args.image)
        if args.mask is not None:
            io.read_mask(args.mask)
        if args.example is not None:
            io.read_image(args.example, "--example")
        # Then the pipeline's class (model_index.json; a Hub id is fetched first): the task, and
        # what it needs, are known before any weights load.
        folder = core.pipeline_folder(args.pipeline)
        asked = None if args.task == "auto" else args.task
        task = pipelines.family_of(core.pipeline_class_name(folder), asked).task
        check_task_inputs(args, task)
        device = core.pick_device(args.device)
        dtype = core.pick_dtype(args.dtype, device)
        pipe = core.load_pipeline(folder, device, dtype, task)
        family = pipelines.family_of(pipe, task)
        asym = core.load_asym(args.ckpt, vae=args.vae, use_ema=args.ema, trust_pickle=args.trust_pickle,
                              device=device, dtype=dtype, need_branch=family.task != "t2i")
        core.check_encoder(pipe.vae, asym)
        multiple = pipelines.size_multiple(pipe)
        if family.task == "t2i":
            side = pipelines.default_size(pipe)
            prep = io.prepare_size(args.width or side, args.height or side, multiple)
        else:
            prep = io.prepare(args.image, args.mask, multiple=multiple, fit=args.fit, example_path=args.example)
        results = core.edit(pipe, asym, prep, task=family.task, tile=args.tile, prompt=args.prompt,
                            negative_prompt=args.negative_prompt, seed=args.seed, steps=args.steps,
                            guidance_scale=args.guidance_scale, strength=args.strength,
                            num_images=args.num_images)
        stem = args.name or (Path(args.image).stem if args.image else "t2i")
        paths = io.save_results(args.out, stem, prep, results)
    except (ValueError, OSError) as e:  # OSError: unreadable files, a full disk or an unwritable --out
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("wrote " + ", ".join(os.fsencode(q).decode("utf-8", "backslashreplace") for q in paths))
    return 0
