#!/usr/bin/env python
"""Write LaMa-style inpainting masks for a folder of images (white = hole).

    python scripts/make_masks.py --images val/ --preset thick --seed 0            # val/NAME_mask.png
    python scripts/make_masks.py --images val/ --preset thin --count 3 --out masks/ --size 512

Each mask depends only on (--seed, image index in sorted order, k), so a rerun gives the same files.
With --count 1 the files are NAME_mask.png (what scripts/evaluate.py --masks reads), otherwise
NAME_mask0.png ... NAME_mask{count-1}.png. Without --size a mask has its image's own size.
Unreadable images (empty, not an image, decompression bombs) are skipped with a warning; each mask
is written atomically, and files that already hold the same mask are kept, so a rerun after a
crash needs no --overwrite.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from ldm_asym.data.masks import PRESETS, MaskGenerator
from ldm_asym.eval.data import displayed_size, list_eval_images, mask_seed, printable
from ldm_asym.util import atomic_write

MIN_SIDE = 16  # MaskGenerator's smallest side


def _mask_png(gen: MaskGenerator, seed: int) -> np.ndarray:
    return (gen(seed)[0].numpy() * 255).astype(np.uint8)


def _same(path: Path, pixels: np.ndarray) -> bool:
    """Whether `path` already holds exactly this mask (a deterministic rerun, e.g. after a crash)."""
    try:
        with Image.open(path) as im:
            return im.mode == "L" and np.array_equal(np.asarray(im), pixels)
    except Exception:  # noqa: BLE001  anything unreadable is simply not the same mask
        return False


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="folder of images (*_mask* files are ignored)")
    p.add_argument("--preset", choices=list(PRESETS), default="thick",
                   help="LaMa preset: thin / medium / thick (eval, hole <= 50%%) or train (no area cap); default thick")
    p.add_argument("--seed", type=int, default=0, help="base seed; default 0")
    p.add_argument("--size", type=int, default=None,
                   help=f"square mask side, >= {MIN_SIDE} (default: each image's own size)")
    p.add_argument("--count", type=int, default=1, help="masks per image; default 1")
    p.add_argument("--out", default=None, help="output folder (default: next to the images)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing mask files that differ (default: error; identical ones are kept)")
    args = p.parse_args(argv)
    try:
        if args.count < 1:
            raise ValueError(f"--count must be >= 1; got {args.count}")
        if args.size is not None and args.size < MIN_SIDE:
            raise ValueError(f"--size must be >= {MIN_SIDE}; got {args.size}")
        images = list_eval_images(args.images)
        out = Path(args.out) if args.out else Path(args.images)
        # Every image's header is read before anything is written: unreadable files are skipped and
        # counted, a too-small image is an error, and neither leaves a partial set of masks behind.
        jobs, skipped = [], []  # (index in sorted order, image, mask shape, file names)
        for i, image in enumerate(images):
            try:
                w, h = displayed_size(image)  # the image as evaluate.py loads it (EXIF-rotated)
            except (ValueError, OSError) as e:
                skipped.append(f"{printable(image.name)} ({e})")
                continue
            if args.size:
                shape = (args.size, args.size)
            elif min(w, h) < MIN_SIDE:
                raise ValueError(f"image {printable(image)} is {w}x{h}: masks need both sides >= {MIN_SIDE} px; pass "
                                 f"--size N (N >= {MIN_SIDE}) to make NxN masks instead of masks of each image's size, "
                                 f"or remove the image")
            else:
                shape = (h, w)
            files = [f"{image.stem}_mask.png"] if args.count == 1 else \
                [f"{image.stem}_mask{k}.png" for k in range(args.count)]
            jobs.append((i, image, shape, files))
        for line in skipped:
            print(f"warning: skipping unreadable image {line}", file=sys.stderr)
        if not jobs:
            raise ValueError(f"none of the {len(images)} images in {printable(args.images)} can be read")
        # A file that already holds exactly the mask this run would write (same seed, preset, size)
        # is kept: a rerun after a crash or a kill then needs no --overwrite.
        todo, same, differ = [], 0, []
        for i, image, shape, files in jobs:
            gen = MaskGenerator(args.preset, shape, p_full=0.0)
            for k, name in enumerate(files):
                path = out / name
                if path.exists() and not args.overwrite:
                    if _same(path, _mask_png(gen, mask_seed(args.seed, i, k))):
                        same += 1
                        continue
                    differ.append(path)
                todo.append((gen, mask_seed(args.seed, i, k), path))
        if differ:  # never clobber hand-drawn masks by accident
            raise FileExistsError(f"{len(differ)} mask files exist and differ from what this run would write, "
                                  f"e.g. {printable(differ[0])} (pass --overwrite)")
        out.mkdir(parents=True, exist_ok=True)
        for gen, seed, path in todo:
            with atomic_write(path, "wb") as f:  # a crash never leaves a truncated mask
                Image.fromarray(_mask_png(gen, seed)).save(f, format="PNG")
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    kept = f" ({same} identical files kept)" if same else ""
    bad = f"; skipped {len(skipped)} unreadable images" if skipped else ""
    print(f"wrote {len(todo)} {args.preset} masks for {len(jobs)} images to {printable(out)}{kept}{bad}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
