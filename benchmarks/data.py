"""Data-loading benchmark: images/s per DataLoader worker of the training dataset.

`data_benchmark` times `ldm_asym.data.ImageFolderDataset` with the training transform (JPEG decode
with draft mode, crop + area resize, LaMa masks) on photo-like JPEGs of ImageNet sizes that
`make_jpegs` writes. Run it through `scripts/benchmark.py --data-only`.
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

PHOTO_SIZES = ((500, 375), (1024, 768))


def make_jpegs(out_dir: str | os.PathLike, photos: str | os.PathLike | None = None, per_size: int = 16,
               sizes=PHOTO_SIZES, quality: int = 95, seed: int = 0) -> dict[str, Path]:
    """Write `per_size` photo-like JPEGs of each size in `sizes` to `out_dir/<W>x<H>/`.

    With `photos` (a folder of images, e.g. ../shared/data/inpainting_examples) each JPEG is a
    random crop of a real photo resized to the target size, plus mild sensor-like noise so that
    upscaled crops keep a photo's entropy; without, a synthetic scene (gradients, shapes, noise).
    Returns {"<W>x<H>": folder}.
    """
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    sources = []
    if photos is not None and Path(photos).is_dir():
        for p in sorted(Path(photos).iterdir()):
            if p.suffix.lower() in (".png", ".jpg", ".jpeg") and "mask" not in p.stem:
                with Image.open(p) as im:
                    sources.append(im.convert("RGB"))
    folders = {}
    for w, h in sizes:
        folder = Path(out_dir) / f"{w}x{h}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_size):
            if sources:
                src = sources[i % len(sources)]
                cw = int(src.width * rng.uniform(0.7, 1.0))
                ch = min(src.height, int(cw * h / w))
                x0, y0 = int(rng.integers(0, src.width - cw + 1)), int(rng.integers(0, src.height - ch + 1))
                im = src.resize((w, h), Image.BICUBIC, box=(x0, y0, x0 + cw, y0 + ch))
            else:
                im = _synthetic_photo(rng, w, h, Image, ImageDraw, ImageFilter)
            a = np.asarray(im, dtype=np.float32) + rng.normal(0, 3.0, (h, w, 3))
            Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(folder / f"img_{i:03d}.jpg", quality=quality)
        folders[f"{w}x{h}"] = folder
    return folders


def _synthetic_photo(rng, w, h, Image, ImageDraw, ImageFilter):
    import numpy as np

    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    base = np.stack([c0 + c1 * xx + c2 * yy for c0, c1, c2 in rng.uniform(0, 255, (3, 3)) / [1, 2, 2]], -1)
    im = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(40):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        r = int(rng.integers(5, max(w, h) // 4))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0 - r, y0 - r, x0 + r, y0 + r], fill=fill)
    return im.filter(ImageFilter.GaussianBlur(1.5))


def data_benchmark(root: str | os.PathLike | None = None, size: int = 256, photos: str | None = None,
                   per_size: int = 16, passes: int = 5, workers: int = 0, seed: int = 0,
                   samples_per_pass: int = 64, shards: bool = False, log: Callable[[str], None] = print) -> dict:
    """Images/s of `ImageFolderDataset(..., size, train=True, masks={"preset": "train", "p_full": 0.5})`.

    One process iterating the dataset is what one DataLoader worker does: `img_s_per_worker` is the
    median over `passes` passes of `samples_per_pass` samples (the files cycled, each sample with
    its own seed, i.e. crop and mask). Also timed per sample stage (JPEG decode with draft mode, crop +
    resize, to tensor, mask). Without `root`, photo-like JPEGs of ImageNet sizes (500x375 and
    1024x768) are generated into a temporary folder, one group per size. `workers` > 0 also times
    a DataLoader with that many workers (total images/s and per worker). `shards`: the same files
    also as litdata shards (scripts/make_shards.py, original bytes kept) read by ShardDataset with
    the same keys, i.e. the same decode and transform: what the shard format itself costs or saves.
    """
    from PIL import Image

    from ldm_asym.data import ImageFolderDataset
    from ldm_asym.data import datasets as D

    tmp = None
    if root is None:
        tmp = tempfile.TemporaryDirectory(prefix="ldm_asym_bench_jpegs_")
        groups = make_jpegs(tmp.name, photos=photos, per_size=per_size, seed=seed)
        source = "real photos re-encoded as JPEG" if photos and Path(photos).is_dir() else "synthetic photo-like JPEGs"
    else:
        groups = {Path(root).name: Path(root)}
        source = str(root)
    out = {"source": source, "size": size, "groups": {}}
    try:
        for name, folder in groups.items():
            ds = ImageFolderDataset(folder, size=size, train=True, masks={"preset": "train", "p_full": 0.5})
            n = len(ds)
            files = [ds.path(i) for i in range(n)]
            with Image.open(files[0]) as im:
                px = im.width * im.height
            nbytes = sum(os.path.getsize(f) for f in files)
            per_pass = max(n, samples_per_pass)  # cycle the files; every sample gets its own crop and mask
            rates = _rates(ds, passes, per_pass, seed)
            stages = _stage_times(ds, files, size, seed, D)
            g = {"images": n, "pixels": px, "bits_per_pixel": round(8 * nbytes / (n * px), 2),
                 "samples_per_pass": per_pass, "img_s_per_worker": statistics.median(rates), "img_s_all": rates,
                 "stage_ms": stages}
            if workers > 0:
                g.update(_loader_rate(ds, workers, passes, per_pass, seed))
            if shards:
                g["shards"] = _shard_rates(files, folder, size, passes, per_pass, workers, seed)
            out["groups"][name] = g
            log(f"[data {name}] {g['img_s_per_worker']:.0f} images/s per worker ({n} files, {px / 1e3:.0f} kpx)")
    finally:
        if tmp is not None:
            tmp.cleanup()
    out["img_s_per_worker_min"] = min(g["img_s_per_worker"] for g in out["groups"].values())
    return out


def _rates(ds, passes: int, per_pass: int, seed: int) -> list[float]:
    """Images/s of one process iterating `ds`, per pass (the first access warms caches and imports)."""
    n = len(ds)
    ds[(0, seed)]
    rates = []
    for p in range(passes):
        t0 = time.perf_counter()
        for i in range(per_pass):
            ds[(i % n, seed * 1_000_003 + p * per_pass + i)]
        rates.append(per_pass / (time.perf_counter() - t0))
    return rates


def _shard_rates(files, folder, size, passes, per_pass, workers, seed) -> dict:
    """The same files as litdata shards (bytes kept, same order), timed like the folder dataset."""
    from ldm_asym.data import ShardDataset
    from ldm_asym.data.shard_writer import Settings, write_shards

    with tempfile.TemporaryDirectory(prefix="ldm_asym_bench_shards_") as tmp:
        keys = [os.path.relpath(f, folder) for f in files]
        write_shards(files, keys, tmp, str(folder), Settings(max_side=1 << 16, keep_bytes=1 << 30))
        ds = ShardDataset(tmp, size=size, train=True, masks={"preset": "train", "p_full": 0.5})
        rates = _rates(ds, passes, per_pass, seed)
        out = {"img_s_per_worker": statistics.median(rates), "img_s_all": rates}
        if workers > 0:
            out.update(_loader_rate(ds, workers, passes, per_pass, seed))
    return out


def _stage_times(ds, files, size, seed, D) -> dict:
    """Median ms per sample of each stage of `ImageFolderDataset.__getitem__`."""
    times = {"decode": [], "crop_resize": [], "to_tensor": [], "mask": []}
    g = torch.Generator().manual_seed(seed)
    for i, path in enumerate(files):
        crop = ds._random_crop(g)
        t0 = time.perf_counter()
        im = D.load_image(path, math.ceil(size / crop.scale))
        t1 = time.perf_counter()
        im = D.crop_resize(im, size, crop)
        t2 = time.perf_counter()
        D.to_tensor(im)
        t3 = time.perf_counter()
        ds.masks(seed + i)
        t4 = time.perf_counter()
        for k, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            times[k].append(dt * 1e3)
    return {k: round(statistics.median(v), 3) for k, v in times.items()}


def _loader_rate(ds, workers: int, passes: int, per_pass: int, seed: int, batch_size: int = 8) -> dict:
    """A DataLoader with `workers` processes (batches of 8, as training collates): total and per worker."""
    from torch.utils.data import DataLoader

    keys = [(i % len(ds), seed + i) for i in range(per_pass)]
    loader = DataLoader(_Keyed(ds, keys), batch_size=batch_size, num_workers=workers, persistent_workers=True)
    for _ in loader:  # start the workers
        pass
    rates = []
    for _ in range(passes):
        t0 = time.perf_counter()
        for _ in loader:
            pass
        rates.append(per_pass / (time.perf_counter() - t0))
    total = statistics.median(rates)
    return {"loader_workers": workers, "loader_batch_size": batch_size, "loader_img_s": total,
            "loader_img_s_per_worker": total / workers}


class _Keyed(torch.utils.data.Dataset):
    def __init__(self, ds, keys):
        self.ds, self.keys = ds, keys

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        return self.ds[self.keys[i]]
