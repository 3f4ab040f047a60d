#!/usr/bin/env python
"""Inpainting evaluation of an asymmetric decoder against the vanilla decoder and the "paste" fix.

All decoders decode the same latents (posterior mode of the evaluated model's frozen encoder):
  vanilla  the baseline's plain decoder
  paste    vanilla with the known pixels pasted back (the naive fix; unmasked error 0 by construction)
  ours     the evaluated decoder, given the image and the mask (1 = hole)

    python scripts/evaluate.py --ckpt logs/<run> --images val/ --masks val/ --out eval/
    python scripts/evaluate.py --ckpt asym-vae/ --baseline sd-vae/ --images val/ --mask-preset thick --seed 0

Writes OUT/summary.json, OUT/summary.md, OUT/per_image.csv and OUT/grids/NAME.png, each atomically
(summary.json last). File names that are not UTF-8 appear in them with \\xNN escapes.
Metrics whose weights are not available offline (LPIPS trunks, FID's Inception) are reported as
unavailable with the reason. See docs/evaluation.md for the metric definitions.
"""

import argparse
import logging
import sys

from ldm_asym.data.masks import PRESETS


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True,
                   help="the model to evaluate: diffusers folder, SD/authors'/our checkpoint file, or run folder")
    p.add_argument("--baseline", default=None,
                   help="vanilla VAE to compare against (default: the vae_source a training checkpoint or run "
                        "folder records; required for any other --ckpt)")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA decoder of a training checkpoint")
    p.add_argument("--images", required=True,
                   help="folder of images (.jpg .jpeg .png .webp .bmp; files named *_mask or *_maskN are ignored)")
    masks = p.add_mutually_exclusive_group(required=True)
    masks.add_argument("--masks", metavar="DIR",
                       help="folder with NAME_mask.png for each NAME.png/.jpg (white = hole; soft/RGB masks "
                            "binarised at 0.5; may be the --images folder)")
    masks.add_argument("--mask-preset", choices=[k for k in PRESETS if k != "train"],
                       help="generate LaMa-style masks instead, seeded by --seed and the image index")
    p.add_argument("--skip-missing-masks", action="store_true",
                   help="skip (and count) images without a mask file instead of failing")
    p.add_argument("--seed", type=int, default=0, help="mask-preset seed (and random LPIPS trunk seed); default 0")
    p.add_argument("--size", type=int, default=512,
                   help="center-crop each image to a square and resize to SIZE (multiple of 8); default 512")
    p.add_argument("--batch-size", type=int, default=4, help="images per batch; default 4")
    p.add_argument("--workers", type=int, default=0, help="image-loading worker processes; default 0")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--inception-weights", metavar="PATH", default=None,
                   help="FID Inception weights (torch-fidelity's weights-inception-2015-12-05-6726825d.pth; "
                        "default: that file in the torch hub cache; needs torch-fidelity installed). Without them FID is "
                        "reported unavailable, with the reason")
    p.add_argument("--lpips-random", action="store_true",
                   help="random LPIPS trunks, for tests only (labelled as such in the outputs)")
    p.add_argument("--max-grids", type=int, default=16, help="write at most this many grids/NAME.png; default 16")
    p.add_argument("--diff-gain", type=float, default=4.0, help="gain of the |ours - input| grid panel; default 4")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow legacy pickles that run code (trusted files only)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    from ldm_asym.evaluation import evaluate, markdown, printable

    try:
        summary = evaluate(
            args.ckpt, args.images, args.out, baseline=args.baseline, masks=args.masks, mask_preset=args.mask_preset,
            seed=args.seed, size=args.size, batch_size=args.batch_size, device=args.device, ema=args.ema,
            trust_pickle=args.trust_pickle, lpips_random=args.lpips_random, inception_weights=args.inception_weights,
            max_grids=args.max_grids, diff_gain=args.diff_gain, skip_missing_masks=args.skip_missing_masks,
            workers=args.workers, progress=not args.quiet,
        )
    except (ValueError, OSError) as e:  # OSError: unreadable inputs, a full disk or an unwritable --out
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(markdown(summary))
    print(f"wrote {printable(args.out)}/summary.json, summary.md, per_image.csv, {len(summary['grids'])} grids")
    return 0


if __name__ == "__main__":
    sys.exit(main())
