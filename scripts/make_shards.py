#!/usr/bin/env python
"""Convert an image folder, an ImageNet tree or a file list into litdata shards for ShardDataset.

    python scripts/make_shards.py --input /data/imagenet/train --out /data/shards/imagenet-512 --workers 16
    python scripts/make_shards.py --file-list laion_subset.txt --root /data/laion --out s3-staging/laion-1024 --max-side 1024

The output folder (copy it to object storage as it is, or read it in place) holds litdata's
chunk-*.bin and index.json plus our manifest.json (counts, skipped inputs with reasons, settings).
Interrupted? Run the same command again: finished parts are kept, index.json appears only at the
end. Train from it with `target: ldm_asym.data.ShardDataset` (configs/asym_sdxl.yaml).
"""

import argparse
import os
import sys

from tqdm import tqdm

from ldm_asym.data.datasets import list_images
from ldm_asym.data.shard_writer import Settings, write_shards


def _inputs(opt) -> tuple[list[str], list[str], str]:
    """(file paths, names stored with them, source description)."""
    if opt.input:
        root = os.path.abspath(opt.input)
        if not os.path.isdir(root):
            sys.exit(f"make_shards.py: error: --input {root} is not a folder")
        keys = list_images(root)  # sorted, recursive (an ImageNet tree's class folders included)
        return [os.path.join(root, k) for k in keys], keys, root
    path = os.path.abspath(opt.file_list)
    if not os.path.isfile(path):
        sys.exit(f"make_shards.py: error: --file-list {path} not found")
    root = os.path.abspath(opt.root) if opt.root else os.path.dirname(path)
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        keys = [s for s in (line.strip() for line in f) if s and not s.startswith("#")]
    return [os.path.join(root, k) for k in keys], keys, path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="image folder, searched recursively (e.g. an ImageNet train/ tree)")
    src.add_argument("--file-list", help="text file with one image path per line ('#' lines ignored)")
    p.add_argument("--root", help="folder the --file-list paths are relative to (default: the list's folder)")
    p.add_argument("--out", required=True, help="output folder for the shards")
    d = Settings()
    p.add_argument("--max-side", type=int, default=d.max_side,
                   help=f"resize so the short side is at most this (default {d.max_side}; 1024 for SDXL/FLUX)")
    p.add_argument("--quality", type=int, default=d.quality, help=f"JPEG quality of resized images (default {d.quality})")
    p.add_argument("--keep-bytes", type=int, default=d.keep_bytes,
                   help=f"keep a file's original bytes when it needs no resize and is at most this big (default {d.keep_bytes})")
    p.add_argument("--part-size", type=int, default=d.part_size,
                   help=f"images per resumable part (default {d.part_size})")
    p.add_argument("--chunk-bytes", default=d.chunk_bytes, help=f"litdata chunk size (default {d.chunk_bytes})")
    p.add_argument("--workers", type=int, default=1, help="processes converting parts in parallel")
    opt = p.parse_args(argv)
    for name in ("max_side", "quality", "part_size", "workers"):
        if getattr(opt, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 1 <= opt.quality <= 100:
        p.error("--quality must be in 1..100")
    files, keys, source = _inputs(opt)
    settings = Settings(opt.max_side, opt.quality, opt.keep_bytes, opt.part_size, opt.chunk_bytes)
    with tqdm(total=len(files), unit="img", desc="shards") as bar:
        try:
            m = write_shards(files, keys, opt.out, source, settings, workers=opt.workers, progress=bar.update)
        except ValueError as e:
            p.exit(2, f"make_shards.py: error: {e}\n")
    print(f"{m['written']} images in {m['parts']} parts -> {os.path.abspath(opt.out)} "
          f"({m['kept_original_bytes']} kept as they were, {len(m['skipped'])} skipped: see manifest.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
