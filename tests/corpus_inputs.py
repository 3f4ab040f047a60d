"""A corpus of hostile inputs for the failure-path tests (issue #11): each function writes one kind
of bad file (or builds one bad tensor) and returns it. Small and fast: decompression bombs are
ordinary small images that become bombs under `bomb_limit` (a lowered Image.MAX_IMAGE_PIXELS)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# Decompression bombs: with Image.MAX_IMAGE_PIXELS = BOMB_LIMIT, Pillow warns above it and raises
# above twice it. BOMB_WARN_SIDE² lies between, BOMB_ERROR_SIDE² beyond.
BOMB_LIMIT = 2000
BOMB_WARN_SIDE = 48  # 2304 px
BOMB_ERROR_SIDE = 100  # 10000 px


def bomb_limit(monkeypatch) -> None:
    """Make images over BOMB_LIMIT pixels decompression bombs for this test."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", BOMB_LIMIT)


def gradient(width: int = 40, height: int = 32, seed: int = 0) -> Image.Image:
    """A smooth RGB image with some noise (JPEG and PNG both compress it to a few KB)."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, width)[None, :, None]
    y = np.linspace(0, 255, height)[:, None, None]
    arr = np.concatenate([x + 0 * y, y + 0 * x, (x + y) / 2], axis=2) + rng.normal(0, 8, (height, width, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def good(folder: Path, name: str = "good.png", size=(40, 32)) -> Path:
    path = Path(folder) / name
    gradient(*size).save(path)
    return path


def _encoded(fmt: str, size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    gradient(*size).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


# ---------------------------------------------------------------------- hostile files
def zero_byte(folder: Path, name: str = "empty.png") -> Path:
    path = Path(folder) / name
    path.write_bytes(b"")
    return path


def truncated_jpeg(folder: Path, name: str = "truncated.jpg") -> Path:
    data = _encoded("JPEG")
    path = Path(folder) / name
    path.write_bytes(data[: len(data) // 2])
    return path


def truncated_png(folder: Path, name: str = "truncated.png") -> Path:
    data = _encoded("PNG")
    path = Path(folder) / name
    path.write_bytes(data[: len(data) // 2])
    return path


def header_only_png(folder: Path, name: str = "header_only.png") -> Path:
    """A valid PNG signature and IHDR chunk and no pixel data: the size reads, decoding fails."""
    data = _encoded("PNG")
    path = Path(folder) / name
    path.write_bytes(data[:33])  # 8-byte signature + 25-byte IHDR chunk
    return path


def text_as_png(folder: Path, name: str = "notes.png") -> Path:
    path = Path(folder) / name
    path.write_text("this is not an image\n" * 20)
    return path


def bomb(folder: Path, name: str = "bomb.png", side: int = BOMB_ERROR_SIDE) -> Path:
    """An image of side² pixels: a bomb once `bomb_limit(monkeypatch)` is in force."""
    path = Path(folder) / name
    gradient(side, side).save(path)
    return path


def one_by_one(folder: Path, name: str = "tiny.png") -> Path:
    path = Path(folder) / name
    Image.new("RGB", (1, 1), (10, 20, 30)).save(path)
    return path


def newline_name(folder: Path, stem: str = "new\nline") -> Path:
    """A valid image whose file name holds a newline."""
    return good(folder, f"{stem}.png")


def non_utf8_name(folder: Path, stem: bytes = b"caf\xe9") -> Path:
    """A valid image whose file name is Latin-1, not UTF-8 (Python sees a surrogate escape)."""
    path = os.path.join(os.fsencode(folder), stem + b".png")
    gradient().save(Path(os.fsdecode(path)))
    return Path(os.fsdecode(path))


def symlink_loop(folder: Path, name: str = "loop") -> Path:
    """`ln -s . loop`: a folder that contains itself."""
    path = Path(folder) / name
    path.symlink_to(".", target_is_directory=True)
    return path


def self_symlink(folder: Path, name: str = "self") -> Path:
    """`ln -s self self`: resolving it fails with ELOOP."""
    path = Path(folder) / name
    path.symlink_to(name)
    return path


def broken_symlink(folder: Path, name: str = "gone.png") -> Path:
    path = Path(folder) / name
    path.symlink_to("does-not-exist.png")
    return path


def symlink_cycle(folder: Path) -> Path:
    """a -> b/ and b/back -> .. : a cycle through two folders."""
    (Path(folder) / "b").mkdir()
    good(Path(folder) / "b", "in_b.png")
    (Path(folder) / "a").symlink_to("b", target_is_directory=True)
    (Path(folder) / "b" / "back").symlink_to("..", target_is_directory=True)
    return Path(folder) / "a"


def fifo(folder: Path, name: str = "pipe.png") -> Path:
    """A named pipe with an image extension: opening it for reading would block forever."""
    path = Path(folder) / name
    os.mkfifo(path)
    return path


# Files every image reader must refuse (name -> writer); the decoders' errors differ per kind. Zero-byte,
# text and bombs already fail at the header (Image.open); truncated files only when decoding.
UNREADABLE = {
    "zero_byte": zero_byte,
    "truncated_jpeg": truncated_jpeg,
    "truncated_png": truncated_png,
    "text_as_png": text_as_png,
    "bomb": bomb,
    "bomb_warn": lambda folder: bomb(folder, "bomb_warn.png", BOMB_WARN_SIDE),
}


# ---------------------------------------------------------------------- decode() inputs
def decode_inputs(kind: str, b: int = 2, size: int = 32, factor: int = 8, seed: int = 0):
    """(z, image, mask) for AsymmetricAutoencoder.decode, made hostile in one way (`kind`).

    good, bool_mask, float64_mask, uint8_mask, float64_image, empty_batch, image_0_255,
    image_uint8, image_slightly_over, image_far_below.
    """
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, 4, size // factor, size // factor, generator=g)
    image = torch.rand(b, 3, size, size, generator=g) * 2 - 1
    mask = (torch.rand(b, 1, size, size, generator=g) > 0.5).float()
    if kind == "good":
        pass
    elif kind == "bool_mask":
        mask = mask.bool()
    elif kind == "float64_mask":  # what torch.from_numpy gives for a numpy float mask
        mask = torch.from_numpy(mask.numpy().astype(np.float64))
    elif kind == "uint8_mask":
        mask = mask.to(torch.uint8)
    elif kind == "float64_image":
        image = torch.from_numpy(image.numpy().astype(np.float64))
    elif kind == "empty_batch":
        z, image, mask = z[:0], image[:0], mask[:0]
    elif kind == "image_0_255":
        image = (image + 1) * 127.5
    elif kind == "image_uint8":
        image = ((image + 1) * 127.5).round().to(torch.uint8)
    elif kind == "image_slightly_over":  # a resampled image overshoots a little: still accepted
        image = image * 1.05
    elif kind == "image_far_below":
        image = image - 3
    else:
        raise ValueError(f"unknown decode input kind {kind!r}")
    return z, image, mask
