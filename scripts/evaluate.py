#!/usr/bin/env python
"""Evaluation of the paper's three tasks (docs/evaluation.md has the protocols and definitions).

--task inpaint (default): an asymmetric decoder against the vanilla decoder and the "paste" fix.
All decoders decode the same latents (posterior mode of the evaluated model's frozen encoder):
  vanilla  the baseline's plain decoder
  paste    vanilla with the known pixels pasted back (the naive fix; unmasked error 0 by construction)
  ours     the evaluated decoder, given the image and the mask (1 = hole)

    python scripts/evaluate.py --ckpt logs/<run> --images val/ --masks val/ --out eval/
    python scripts/evaluate.py --ckpt asym-vae/ --baseline sd-vae/ --images val/ --mask-preset thick --seed 0

--task pbe: Paint-by-Example results (COCOEE protocol): region CLIP score, pre error, FID.
    python scripts/evaluate.py --task pbe --results out/ --sources GT_3500/ --masks Mask_bbox_3500/ \\
        --references Ref_3500/ --clip clip-vit-base-patch32/ --fid-reference test_set_GT/ --out eval-pbe/

--task t2i: FID and Inception Score of generated images against a reference folder.
    python scripts/evaluate.py --task t2i --results samples/ --fid-reference coco-val/ --out eval-t2i/

Writes OUT/summary.json, OUT/summary.md (and OUT/per_image.csv for inpaint and pbe, OUT/grids/NAME.png
for inpaint), each atomically (summary.json last). File names that are not UTF-8 appear in them with
\\xNN escapes. Metrics whose weights are not available offline (LPIPS trunks, FID's Inception, CLIP) are
reported as unavailable with the reason.
"""

import argparse
import logging
import sys

from ldm_asym.data.masks import PRESETS

TASKS = ("inpaint", "pbe", "t2i")
COMMON = {"task", "out", "size", "batch_size", "workers", "device", "inception_weights", "quiet"}
# Options each task takes (beyond COMMON) and those it requires; any other option is refused.
TASK_ARGS = {
    "inpaint": {"ckpt", "baseline", "ema", "images", "masks", "mask_preset", "skip_missing_masks", "seed",
                "lpips_random", "max_grids", "diff_gain", "trust_pickle"},
    "pbe": {"results", "sources", "masks", "references", "clip", "fid_reference"},
    "t2i": {"results", "fid_reference", "is_splits", "seed"},
}
REQUIRED = {"inpaint": ("ckpt", "images"), "pbe": ("results", "sources", "masks", "references"),
            "t2i": ("results", "fid_reference")}


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=TASKS, default="inpaint",
                   help="inpaint (default): decoders on images + masks; pbe: Paint-by-Example results; "
                        "t2i: generated images")
    p.add_argument("--ckpt",
                   help="the model to evaluate: diffusers folder, SD/authors'/our checkpoint file, or run folder")
    p.add_argument("--baseline", default=None,
                   help="vanilla VAE to compare against (default: the vae_source a training checkpoint or run "
                        "folder records; required for any other --ckpt)")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA decoder of a training checkpoint")
    p.add_argument("--images",
                   help="inpaint: folder of images (.jpg .jpeg .png .webp .bmp; files named *_mask or *_maskN are ignored)")
    masks = p.add_mutually_exclusive_group()
    masks.add_argument("--masks", metavar="DIR",
                       help="inpaint: folder with NAME_mask.png for each NAME.png/.jpg (white = hole; soft/RGB masks "
                            "binarised at 0.5; may be the --images folder). pbe: the masks of the results (white = edited region), "
                            "paired by name")
    masks.add_argument("--mask-preset", choices=[k for k in PRESETS if k != "train"],
                       help="generate LaMa-style masks instead, seeded by --seed and the image index")
    p.add_argument("--skip-missing-masks", action="store_true",
                   help="skip (and count) images without a mask file instead of failing")
    p.add_argument("--seed", type=int, default=None,
                   help="mask-preset seed (and random LPIPS trunk seed); t2i: Inception Score shuffle seed; default 0")
    p.add_argument("--results", metavar="DIR", help="pbe: the edited images; t2i: the generated images")
    p.add_argument("--sources", metavar="DIR", help="pbe: the unedited source images (for the pre error)")
    p.add_argument("--references", metavar="DIR", help="pbe: the exemplar images (for the CLIP score)")
    p.add_argument("--clip", metavar="DIR",
                   help="pbe: local CLIP ViT-B/32 folder (e.g. a copy of openai/clip-vit-base-patch32); without it "
                        "the CLIP score is reported unavailable")
    p.add_argument("--fid-reference", metavar="DIR",
                   help="FID's real images; t2i: required; pbe: default --sources (COCOEE: square GT crops)")
    p.add_argument("--is-splits", type=int, default=None, help="t2i: Inception Score splits; default 10")
    p.add_argument("--size", type=int, default=512,
                   help="center-crop each image to a square and resize to SIZE (inpaint: multiple of 8; pbe/t2i: "
                        "the images FID sees); default 512")
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


def check_task_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse options of another task and missing required ones, naming them (argparse exits with 2)."""
    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    given = {k for k, v in vars(args).items() if v != p.get_default(k)}
    foreign = sorted(given - COMMON - TASK_ARGS[args.task])
    if foreign:
        p.error(f"{', '.join(map(flag, foreign))} not used by --task {args.task}")
    missing = [flag(k) for k in REQUIRED[args.task] if getattr(args, k) is None]
    if missing:
        p.error(f"--task {args.task} needs {', '.join(missing)}")
    if args.task == "inpaint" and args.masks is None and args.mask_preset is None:
        p.error("--task inpaint needs --masks DIR or --mask-preset NAME")


def run_task(args: argparse.Namespace):
    """-> (summary, its Markdown, what was written)."""
    seed = 0 if args.seed is None else args.seed
    if args.task == "pbe":
        from ldm_asym.eval import pbe

        summary = pbe.evaluate_pbe(
            args.results, args.sources, args.masks, args.references, args.out, clip=args.clip,
            fid_reference=args.fid_reference, inception_weights=args.inception_weights, size=args.size,
            batch_size=args.batch_size, device=args.device, workers=args.workers)
        return summary, pbe.markdown(summary), "summary.json, summary.md, per_image.csv"
    if args.task == "t2i":
        from ldm_asym.eval import t2i

        summary = t2i.evaluate_t2i(
            args.results, args.fid_reference, args.out, inception_weights=args.inception_weights, size=args.size,
            batch_size=args.batch_size, is_splits=10 if args.is_splits is None else args.is_splits, seed=seed,
            device=args.device, workers=args.workers)
        return summary, t2i.markdown(summary), "summary.json, summary.md"
    from ldm_asym.eval import inpainting

    summary = inpainting.evaluate(
        args.ckpt, args.images, args.out, baseline=args.baseline, masks=args.masks, mask_preset=args.mask_preset,
        seed=seed, size=args.size, batch_size=args.batch_size, device=args.device, ema=args.ema,
        trust_pickle=args.trust_pickle, lpips_random=args.lpips_random, inception_weights=args.inception_weights,
        max_grids=args.max_grids, diff_gain=args.diff_gain, skip_missing_masks=args.skip_missing_masks,
        workers=args.workers, progress=not args.quiet,
    )
    return summary, inpainting.markdown(summary), f"summary.json, summary.md, per_image.csv, {len(summary['grids'])} grids"


def main(argv=None) -> int:
    parser = get_parser()
    args = parser.parse_args(argv)
    check_task_args(parser, args)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    from ldm_asym.eval.data import printable

    try:
        summary, md, written = run_task(args)
    except (ValueError, OSError) as e:  # OSError: unreadable inputs, a full disk or an unwritable --out
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(md)
    print(f"wrote {printable(args.out)}/{written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
