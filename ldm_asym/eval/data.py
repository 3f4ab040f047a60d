"""Evaluation inputs: image and mask folders, pairing by name, loading in a fixed geometry.

Images are read upright (EXIF) as RGB; `load_eval_image` center-crops to a square and resizes, so
every task compares images of one size. Masks are white = hole (1), binarised at 0.5.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ldm_asym.data.datasets import (
    _DECODE_ERRORS,
    IMAGE_EXTENSIONS,
    UnusableImageError,
    crop_resize,
    load_image,
    to_tensor,
)
from ldm_asym.data.masks import MaskGenerator, load_mask

MASK_STEM = re.compile(r"_mask\d*$")
# Suffixes that name a file's role rather than the sample (COCOEE's test bench: 000000xxx_GT.png,
# _mask.png, _ref.png): `sample_key` drops them so the files of one sample pair up across folders.
ROLE_SUFFIX = re.compile(r"_(gt|mask|ref)$", re.IGNORECASE)


def mask_seed(seed: int, index: int, k: int = 0) -> int:
    """A well-mixed 32-bit seed for mask `k` of image `index` (so neighbouring seeds don't correlate)."""
    return int(np.random.SeedSequence([seed, index, k]).generate_state(1)[0])


def list_images(folder: str | os.PathLike, what: str = "image", skip_masks: bool = True) -> list[Path]:
    """Image files directly in `folder`, sorted; mask files (`*_mask.png`, `*_mask3.png`) excluded unless not `skip_masks`.

    `what` names the folder's role in errors ("image", "result", "reference", ...).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                   and not (skip_masks and MASK_STEM.search(p.stem)))
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {what} folder {folder}")
    stems = [p.stem for p in files]
    dupes = sorted({s for s in stems if stems.count(s) > 1})
    if dupes:  # NAME.png and NAME.jpg would share NAME_mask.png and the output names
        raise ValueError(f"images share a name in {folder}: {', '.join(dupes)}")
    return files


def list_eval_images(folder: str | os.PathLike) -> list[Path]:
    """`list_images` of the inpainting input folder (which may also hold the masks)."""
    return list_images(folder)


def pair_masks(images: list[Path], masks_dir: str | os.PathLike, skip_missing: bool = False):
    """-> ([(image, NAME_mask.png)], [images without a mask]); a missing mask is an error unless skipped."""
    masks_dir = Path(masks_dir)
    if not masks_dir.is_dir():
        raise FileNotFoundError(f"mask folder not found: {masks_dir}")
    pairs, missing = [], []
    for image in images:
        mask = masks_dir / f"{image.stem}_mask.png"
        if mask.is_file():
            pairs.append((image, mask))
        elif skip_missing:
            missing.append(image)
        else:
            raise FileNotFoundError(f"no mask for {image}: expected {mask} (or pass --skip-missing-masks)")
    if not pairs:
        raise FileNotFoundError(f"none of the {len(images)} images has a NAME_mask.png in {masks_dir}")
    return pairs, missing


def sample_key(path: Path) -> str:
    """The sample a file belongs to: its stem without a role suffix (`_GT`, `_mask`, `_ref`)."""
    return ROLE_SUFFIX.sub("", path.stem)


def pair_by_stem(primary: list[Path], **folders: str | os.PathLike) -> list[dict[str, Path]]:
    """For each file of `primary`, the file of the same sample (`sample_key`) in each folder.

    -> [{"name": key, "primary": path, <folder name>: path, ...}]. A sample missing from a folder is
    an error naming the folder argument and the first few missing names.
    """
    found = {}
    for arg, folder in folders.items():
        files = list_images(folder, what=arg, skip_masks=False)
        by_key: dict[str, Path] = {}
        for f in files:
            if by_key.setdefault(sample_key(f), f) != f:
                raise ValueError(f"two files of sample {sample_key(f)} in --{arg} {folder}: {by_key[sample_key(f)].name}, {f.name}")
        missing = [p.name for p in primary if sample_key(p) not in by_key]
        if missing:
            raise FileNotFoundError(f"{len(missing)} of {len(primary)} samples have no file in --{arg} {folder} "
                                    f"(paired by name without _GT/_mask/_ref): {', '.join(missing[:5])}")
        found[arg] = by_key
    return [{"name": sample_key(p), "primary": p, **{a: found[a][sample_key(p)] for a in folders}} for p in primary]


def load_eval_image(path: str | os.PathLike, size: int) -> torch.Tensor:
    """Center square crop (full short side) resized to size×size, 3×S×S in [-1, 1]."""
    try:
        return to_tensor(crop_resize(load_image(path), size))
    except UnusableImageError as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


def load_full_image(path: str | os.PathLike) -> Image.Image:
    """The whole image, upright RGB; ValueError naming the file if it cannot be read."""
    try:
        return load_image(path)
    except UnusableImageError as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


def load_eval_mask(path: str | os.PathLike, size: int, image_size: tuple[int, int]) -> torch.Tensor:
    """A mask (white = hole) in the geometry of `load_eval_image`, 1×S×S in {0, 1}.

    The file is binarised at 0.5 at its own resolution (`load_mask`: soft edges, RGB), then cut
    and resized exactly as its image (area filter, binarised again at 0.5). A mask that is
    already size×size is taken as made for the cropped view (e.g. make_masks.py --size).
    `image_size` is the original image's (width, height).
    """
    hole = load_mask(path)[0].numpy()
    h, w = hole.shape
    if (w, h) == (size, size):
        return torch.from_numpy(hole)[None]
    if (w, h) != tuple(image_size):
        if abs(w / h - image_size[0] / image_size[1]) > 0.01:
            raise ValueError(f"mask {path} is {w}x{h} but its image is {image_size[0]}x{image_size[1]} "
                             f"(and it is not {size}x{size})")
        hole = np.asarray(Image.fromarray(hole).resize(image_size, Image.NEAREST))
    view = crop_resize(Image.fromarray(hole.astype(np.float32)), size)
    return torch.from_numpy((np.asarray(view) >= 0.5).astype(np.float32))[None]


def displayed_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) after EXIF rotation, as `load_image` returns it, from the header alone.

    ValueError naming the file for what `load_image` would refuse from its header: not an image,
    empty, or a decompression bomb (over Pillow's MAX_IMAGE_PIXELS). Truncated pixel data only
    shows when decoding.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                return (h, w) if im.getexif().get(0x0112) in (5, 6, 7, 8) else (w, h)
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}") from None
    except _DECODE_ERRORS as e:
        raise ValueError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


def printable(name: str | os.PathLike) -> str:
    """A file name as valid UTF-8 text: bytes that are not UTF-8 (Python's surrogate escapes) become `\\xNN`.

    CSV, JSON and Markdown outputs must be UTF-8; a non-UTF-8 name (Latin-1 `caf\\xe9.png`) would
    otherwise make writing them fail after all the work.
    """
    return os.fspath(name).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class EvalSet(Dataset):
    """(name, image, mask) items: masks from files, or a LaMa preset seeded per image index."""

    def __init__(self, images: list[Path], size: int, masks: list[Path] | None = None,
                 preset: str | None = None, seed: int = 0):
        if (masks is None) == (preset is None):
            raise ValueError("give mask files or a mask preset, not both")
        self.images, self.masks, self.size, self.seed = images, masks, size, seed
        self.generator = MaskGenerator(preset, size, p_full=0.0) if preset else None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        image = load_eval_image(self.images[i], self.size)
        if self.masks is not None:
            mask = load_eval_mask(self.masks[i], self.size, displayed_size(self.images[i]))
        else:
            mask = self.generator(mask_seed(self.seed, i))
        return {"name": self.images[i].stem, "image": image, "mask": mask}


class FolderSet(Dataset):
    """(name, image) items of `load_eval_image`: the sets FID and the Inception Score compare."""

    def __init__(self, images: list[Path], size: int):
        self.images, self.size = images, size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"name": self.images[i].stem, "image": load_eval_image(self.images[i], self.size)}


def check_headers(files: list[Path]) -> None:
    """Fail on an empty / non-image / bomb file now, before minutes of model loading and decoding."""
    for f in files:
        displayed_size(f)
