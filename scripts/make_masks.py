#!/usr/bin/env python
"""Write LaMa-style inpainting masks for a folder of images (white = hole).

    python scripts/make_masks.py --images val/ --preset thick --seed 0            # val/NAME_mask.png
    python scripts/make_masks.py --images val/ --preset thin --count 3 --out masks/ --size 512

Each mask depends only on (--seed, image index in sorted order, k), so a rerun gives the same files.
With --count 1 the files are NAME_mask.png (what scripts/evaluate.py --masks reads), otherwise
NAME_mask0.png ... NAME_mask{count-1}.png. Without --size a mask has its image's own size.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from ldm_asym.data.masks import PRESETS, MaskGenerator
from ldm_asym.evaluation import displayed_size, list_eval_images, mask_seed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="folder of images (*_mask* files are ignored)")
    p.add_argument("--preset", choices=list(PRESETS), default="thick",
                   help="LaMa preset: thin / medium / thick (eval, hole <= 50%%) or train (no area cap); default thick")
    p.add_argument("--seed", type=int, default=0, help="base seed; default 0")
    p.add_argument("--size", type=int, default=None, help="square mask side (default: each image's own size)")
    p.add_argument("--count", type=int, default=1, help="masks per image; default 1")
    p.add_argument("--out", default=None, help="output folder (default: next to the images)")
    p.add_argument("--overwrite", action="store_true", help="replace existing mask files (default: error)")
    args = p.parse_args(argv)
    try:
        if args.count < 1:
            raise ValueError(f"--count must be >= 1; got {args.count}")
        images = list_eval_images(args.images)
        out = Path(args.out) if args.out else Path(args.images)
        names = [[f"{im.stem}_mask.png"] if args.count == 1 else [f"{im.stem}_mask{k}.png" for k in range(args.count)]
                 for im in images]
        existing = [out / n for ns in names for n in ns if (out / n).exists()]
        if existing and not args.overwrite:  # never clobber hand-drawn masks by accident
            raise FileExistsError(f"{len(existing)} mask files exist, e.g. {existing[0]} (pass --overwrite)")
        out.mkdir(parents=True, exist_ok=True)
        for i, (image, files) in enumerate(zip(images, names)):
            if args.size:
                shape = args.size
            else:
                w, h = displayed_size(image)  # the image as evaluate.py loads it (EXIF-rotated)
                shape = (h, w)
            gen = MaskGenerator(args.preset, shape, p_full=0.0)
            for k, name in enumerate(files):
                hole = gen(mask_seed(args.seed, i, k))[0].numpy()
                Image.fromarray((hole * 255).astype(np.uint8)).save(out / name)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {sum(map(len, names))} {args.preset} masks for {len(images)} images to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
