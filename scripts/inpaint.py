#!/usr/bin/env python
"""Text-guided inpainting with an SD inpainting pipeline: its own VAE decoder vs our asymmetric one.

The diffusion runs once; its latents are decoded by the pipeline's VAE and by our decoder (which
also sees the known pixels), so the decoder is the only difference. Writes
OUT/NAME_vanilla_{k}.png, OUT/NAME_asym_{k}.png and OUT/NAME_compare.png (input | mask | vanilla |
asym per row), at the input's original size, and logs each result's known-pixel error.

    python scripts/inpaint.py --pipeline sd-inpainting/ --ckpt logs/<run>/checkpoints/last.ckpt \\
        --image photo.png --mask photo_mask.png --prompt "a red bench" --num-images 2 --out out/

Masks: white = hole; grey, RGB, RGBA (transparent = known) or 16-bit; soft masks are binarised at
0.5 (as the pipeline itself does). Any image size: padded (--fit pad, default) or resized
(--fit resize) to multiples of 8 for the pipeline, and brought back to the original size.
"""

import argparse
import logging
import os
import sys
from pathlib import Path

from ldm_asym import inpaint


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", required=True, help="diffusers SD inpainting pipeline: local folder or Hub id")
    p.add_argument("--ckpt", required=True,
                   help="our decoder: diffusers AsymmetricAutoencoderKL folder, training checkpoint or run folder, "
                        "authors' checkpoint (anything load_autoencoder reads)")
    p.add_argument("--vae", default=None, help="take the frozen encoder from here (decoder-only checkpoints)")
    p.add_argument("--ema", action="store_true", help="use the EMA decoder weights of a training checkpoint")
    p.add_argument("--trust-pickle", action="store_true", help="allow pickles that run code (trusted files only)")
    p.add_argument("--image", required=True, help="input image (any size)")
    p.add_argument("--mask", required=True, help="mask image, white = hole")
    p.add_argument("--prompt", default="", help="what to paint into the hole")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--seed", type=int, default=0, help="seed of the (CPU) noise generator")
    p.add_argument("--steps", type=int, default=50, help="denoising steps")
    p.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance (<= 1: off)")
    p.add_argument("--num-images", type=int, default=1, help="samples per prompt")
    p.add_argument("--fit", choices=("pad", "resize"), default="pad",
                   help="reach multiples of 8 by mirror-padding (known pixels never resampled) or resizing")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"),
                   help="auto: float16 on CUDA, float32 elsewhere")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--name", default=None, help="file name prefix (default: the image's file name stem)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        # The inputs are checked first: a bad --image or --mask must not wait for the models to load.
        inpaint.read_image(args.image)
        inpaint.read_mask(args.mask)
        device = inpaint.pick_device(args.device)
        dtype = inpaint.pick_dtype(args.dtype, device)
        pipe = inpaint.load_pipeline(args.pipeline, device, dtype)
        asym = inpaint.load_asym_vae(args.ckpt, vae=args.vae, use_ema=args.ema, trust_pickle=args.trust_pickle,
                                     device=device, dtype=dtype)
        inpaint.check_encoder(pipe.vae, asym)
        prep = inpaint.prepare(args.image, args.mask, multiple=pipe.vae_scale_factor, fit=args.fit)
        results = inpaint.inpaint(pipe, asym, prep, args.prompt, negative_prompt=args.negative_prompt,
                                  seed=args.seed, steps=args.steps, guidance_scale=args.guidance_scale,
                                  num_images=args.num_images)
        paths = inpaint.save_results(args.out, args.name or Path(args.image).stem, prep, results)
    except (ValueError, OSError) as e:  # OSError: unreadable files, a full disk or an unwritable --out
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("wrote " + ", ".join(os.fsencode(q).decode("utf-8", "backslashreplace") for q in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
