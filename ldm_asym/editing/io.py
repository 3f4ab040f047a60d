"""Files in and out of an edit: the input image, mask and example, sizes the pipeline accepts, results.

Masks (white = hole) are read with `ldm_asym.data.load_mask`: grey, RGB, RGBA (transparent = known)
and 16-bit files, soft values binarised at 0.5. Every pipeline here would do the same to a soft mask
(SD / SDXL / FLUX Fill: `mask_processor` converts to grey, then `< 0.5 -> 0`, `>= 0.5 -> 1`;
Paint-by-Example: its own threshold at 0.5 after inverting), so we hand it an already binary mask
and the pipeline and both decoders see the very same one.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps

from ldm_asym.data.datasets import _DECODE_ERRORS
from ldm_asym.data.masks import load_mask
from ldm_asym.metrics import unmasked_error
from ldm_asym.util import atomic_write

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------- inputs
def read_image(path, arg: str = "--image") -> Image.Image:
    """The RGB image at `path`, upright as viewers show it (EXIF), fully decoded.

    Empty, truncated, non-image and decompression-bomb files (over Pillow's MAX_IMAGE_PIXELS,
    even those Pillow only warns about) raise ValueError naming `arg` and the file.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                return ImageOps.exif_transpose(im).convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"{arg} {path}: file not found") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"{arg} {path}: refused as a possible decompression bomb ({e})") from e
    except _DECODE_ERRORS as e:
        raise ValueError(f"{arg} {path}: cannot read it as an image ({type(e).__name__}: {e})") from e


def read_mask(path, size: tuple[int, int] | None = None, arg: str = "--mask") -> torch.Tensor:
    """`load_mask` (1 x H x W, 1 = hole) with errors that name `arg`."""
    try:
        return load_mask(path, size=size)
    except FileNotFoundError:
        raise FileNotFoundError(f"{arg} {path}: file not found") from None
    except ValueError as e:
        raise ValueError(f"{arg}: {e}") from e


# ---------------------------------------------------------------------- sizes
@dataclass
class Prepared:
    """What one edit works on: sizes, and (for editing tasks) the image and mask at the working size.

    `size` is the size asked for (the input's, or --width x --height for text-to-image) and
    `work_size` the one the pipeline runs at (multiples of what it needs); `restore` maps back.
    """

    size: tuple[int, int]  # (w, h)
    work_size: tuple[int, int]  # (w, h), multiples of the pipeline's size multiple
    fit: str = "pad"
    image: Image.Image | None = None  # RGB at work_size
    mask: Image.Image | None = None  # "L", 0 / 255 (white = hole), at work_size
    original: Image.Image | None = None  # the RGB input as read
    original_mask: Image.Image | None = None  # the binary mask at the original size
    example: Image.Image | None = None  # Paint-by-Example's reference (its encoder resizes it)

    def restore(self, im: Image.Image) -> Image.Image:
        """A result at the working size -> the asked size (crop the padding, or resize back)."""
        if im.size == self.size:
            return im
        if self.fit == "pad":
            return im.crop((0, 0, *self.size))
        return im.resize(self.size, Image.LANCZOS)


def prepare(image_path, mask_path, multiple: int = 8, fit: str = "pad", example_path=None) -> Prepared:
    """Read image and mask (and a Paint-by-Example reference) and bring them to multiples of `multiple`.

    Pipelines refuse other sizes (`check_inputs`: height and width divisible by their
    vae_scale_factor: 8, FLUX 16 for its 2x2 latent packing); their denoisers cope with any latent
    size. fit="pad" mirrors up to multiple-1 pixels at the right/bottom and crops them off
    afterwards, so known pixels are never resampled (the point of this decoder); fit="resize"
    rescales to the nearest multiple and back.
    """
    image = read_image(image_path)  # as viewers (and mask editors) show it
    w, h = image.size
    if min(w, h) < multiple:
        raise ValueError(f"--image {image_path} is {w}x{h}; both sides must be at least {multiple} px")
    mask = read_mask(mask_path)[0]
    if tuple(mask.shape) != (h, w):
        log.warning("mask %s is %dx%d, image is %dx%d: resizing the mask (nearest)", mask_path,
                    mask.shape[1], mask.shape[0], w, h)
        mask = read_mask(mask_path, size=(h, w))[0]
    mask = original_mask = Image.fromarray((mask.numpy() * 255).astype(np.uint8), "L")
    original = image
    if fit == "pad":
        pad = ((0, -h % multiple), (0, -w % multiple))
        image = Image.fromarray(np.pad(np.asarray(image), pad + ((0, 0),), mode="symmetric"))
        mask = Image.fromarray(np.pad(np.asarray(mask), pad, mode="symmetric"))
    elif fit == "resize":
        size = tuple(max(multiple, round(s / multiple) * multiple) for s in (w, h))
        image = image.resize(size, Image.LANCZOS)
        mask = mask.resize(size, Image.NEAREST)  # stays binary
    else:
        raise ValueError(f"fit must be 'pad' or 'resize'; got {fit!r}")
    example = None if example_path is None else read_image(example_path, "--example")
    return Prepared((w, h), image.size, fit, image, mask, original, original_mask, example)


def prepare_size(width: int, height: int, multiple: int = 8) -> Prepared:
    """Text-to-image: generate at the next multiples of `multiple` and crop back to width x height."""
    if min(width, height) < 1:
        raise ValueError(f"--width and --height must be positive; got {width}x{height}")
    work = tuple(-(-s // multiple) * multiple for s in (width, height))
    if work != (width, height):
        log.info("generating at %dx%d (multiples of %d) and cropping to %dx%d", *work, multiple, width, height)
    return Prepared((width, height), work, "pad")


# ---------------------------------------------------------------------- results
def known_pixel_error(original: Image.Image, result: Image.Image, mask: Image.Image) -> float:
    """The paper's unmasked error (MSE on known pixels, [0, 1] scale) in units of 1e-5."""
    t = lambda im: torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1  # noqa: E731
    m = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255)[None, None]
    return float(unmasked_error(t(original), t(result), m)[0]) * 1e5


def comparison(prep: Prepared, results: dict[str, list[Image.Image]]) -> Image.Image:
    """One row per sample: [input | input with the hole greyed | example |] vanilla | asym."""
    w, h = prep.size
    inputs, labels = [], []
    if prep.original is not None:
        holed = Image.composite(Image.new("RGB", prep.size, (128, 128, 128)), prep.original, prep.original_mask)
        inputs, labels = [prep.original, holed], ["input", "mask"]
    if prep.example is not None:
        inputs.append(ImageOps.pad(prep.example, (w, h), color="white"))
        labels.append("example")
    rows = [inputs + [v, a] for v, a in zip(results["vanilla"], results["asym"])]
    labels += ["vanilla", "asym"]
    grid = Image.new("RGB", (len(labels) * w, len(rows) * h), "white")
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            grid.paste(im, (c * w, r * h))
    draw = ImageDraw.Draw(grid)
    for c, label in enumerate(labels):
        draw.text((c * w + 3, 2), label, fill="white", stroke_width=1, stroke_fill="black")
    return grid


def save_results(out_dir, name: str, prep: Prepared, results: dict[str, list[Image.Image]]) -> list[Path]:
    """OUT/NAME_{vanilla,asym}_{k}.png and OUT/NAME_compare.png, each written atomically; logs the
    known-pixel error of each (editing tasks)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for kind, images in results.items():
        for k, im in enumerate(images):
            paths.append(out_dir / f"{name}_{kind}_{k}.png")
            with atomic_write(paths[-1], "wb") as f:
                im.save(f, format="PNG")
            if prep.original_mask is not None:
                err = known_pixel_error(prep.original, im, prep.original_mask)
                log.info("%s: known-pixel MSE %.1fe-5", paths[-1].name, err)
    paths.append(out_dir / f"{name}_compare.png")
    with atomic_write(paths[-1], "wb") as f:
        comparison(prep, results).save(f, format="PNG")
    return paths
