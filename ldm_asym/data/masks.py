"""LaMa-style random inpainting masks (Suvorov et al. 2022), drawn with PIL instead of OpenCV.

Convention: 1 = hole (to generate), 0 = known pixel; masks are float32 tensors of shape 1×H×W.

The generators reproduce LaMa's `make_random_irregular_mask` / `make_random_rectangle_mask`
(saicinpainting/training/data/masks.py) including their quirks, so the eval presets give the
same mask statistics as LaMa's published `random_{thin,medium,thick}_256` benchmarks.
"""

from __future__ import annotations

import math
import os
import struct
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw


@dataclass(frozen=True)
class Strokes:
    """Irregular brush strokes. Pixel sizes are at 256 px; all ranges are inclusive.

    Each stroke has 1..max_vertex segments of length min_len + randint(max_len) and width
    min_width + randint(max_width) (LaMa's `10 + randint(max_len)`, `5 + randint(max_width)`).
    """

    min_times: int
    max_times: int
    max_len: int
    max_width: int
    max_angle: int = 4
    max_vertex: int = 5
    min_len: int = 10
    min_width: int = 5


@dataclass(frozen=True)
class Boxes:
    """Axis-aligned rectangles with sides in [bbox_min_size, bbox_max_size], `margin` px from the border."""

    min_times: int
    max_times: int
    bbox_min_size: int
    bbox_max_size: int
    margin: int


@dataclass(frozen=True)
class MaskPreset:
    """A mixture of generators picked with the given (unnormalised) weights, as LaMa's MixedMaskGenerator.

    `max_hole`: masks covering more than this fraction are redrawn; LaMa's eval sets were made
    this way (`max_tamper_area: 0.5` in bin/gen_mask_dataset.py), its training masks were not.
    """

    kinds: tuple[tuple[float, Strokes | Boxes], ...]
    max_hole: float = 1.0


# Values from advimman/lama configs/data_gen/random_{thin,medium,thick}_256.yaml, converted to
# inclusive ranges: LaMa's RandomIrregularMaskGenerator passes max_times + 1 to the drawing code
# (so max_times: 5 gives 1..6 strokes) and RandomRectangleMaskGenerator passes bbox_max_size + 1
# to an exclusive randint (so sides reach bbox_max_size). Weights 1 : 0.3 are LaMa's
# irregular_proba / box_proba, i.e. p = 0.77 / 0.23 after normalisation.
_THICK = (
    (1.0, Strokes(min_times=1, max_times=6, max_len=200, max_width=100)),
    (0.3, Boxes(min_times=1, max_times=3, bbox_min_size=30, bbox_max_size=150, margin=10)),
)
PRESETS: dict[str, MaskPreset] = {
    # The paper trains on LaMa's "thick" masks; no area cap, as in LaMa's training generator.
    "train": MaskPreset(_THICK),
    "thin": MaskPreset(((1.0, Strokes(min_times=4, max_times=51, max_len=40, max_width=10)),), max_hole=0.5),
    "medium": MaskPreset(
        (
            (1.0, Strokes(min_times=4, max_times=6, max_len=100, max_width=50)),
            (0.3, Boxes(min_times=1, max_times=5, bbox_min_size=10, bbox_max_size=50, margin=0)),
        ),
        max_hole=0.5,
    ),
    "thick": MaskPreset(_THICK, max_hole=0.5),
}

# Reference resolution of the preset pixel sizes.
_BASE_SIZE = 256
# Redraws allowed for a preset's area cap; about a third of thick draws exceed 0.5, so 100 never run out.
_MAX_REDRAWS = 100


def _px(value: int, scale: float) -> int:
    return max(1, round(value * scale))


def draw_strokes(rng: np.random.Generator, shape: tuple[int, int], p: Strokes, scale: float = 1.0) -> np.ndarray:
    """Boolean H×W mask of random brush strokes (LaMa's make_random_irregular_mask)."""
    height, width = shape
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    min_len, max_len = _px(p.min_len, scale), _px(p.max_len, scale)
    min_width, max_width = _px(p.min_width, scale), _px(p.max_width, scale)
    for i in range(rng.integers(p.min_times, p.max_times + 1)):
        x, y = int(rng.integers(width)), int(rng.integers(height))
        for _ in range(1 + rng.integers(p.max_vertex)):
            # LaMa draws whole radians (0.01 + randint) and mirrors every other stroke.
            angle = 0.01 + rng.integers(p.max_angle)
            if i % 2 == 0:
                angle = 2 * math.pi - angle
            length = min_len + int(rng.integers(max_len))
            brush = min_width + int(rng.integers(max_width))
            # Truncated and clipped to [0, size] like LaMa's astype(int32) + np.clip.
            end_x = min(max(int(x + length * math.sin(angle)), 0), width)
            end_y = min(max(int(y + length * math.cos(angle)), 0), height)
            draw.line([(x, y), (end_x, end_y)], fill=255, width=brush)
            # cv2.line gives thick lines round caps; PIL cuts them square, so add the caps.
            r = brush / 2
            for cx, cy in ((x, y), (end_x, end_y)):
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
            x, y = end_x, end_y
    return np.asarray(canvas) > 0


def draw_boxes(rng: np.random.Generator, shape: tuple[int, int], p: Boxes, scale: float = 1.0) -> np.ndarray:
    """Boolean H×W mask of random rectangles (LaMa's make_random_rectangle_mask)."""
    height, width = shape
    mask = np.zeros(shape, dtype=bool)
    margin = round(p.margin * scale)
    hi = max(1, min(_px(p.bbox_max_size, scale), height - 2 * margin, width - 2 * margin))
    lo = min(_px(p.bbox_min_size, scale), hi)  # a narrow image caps both bounds
    for _ in range(rng.integers(p.min_times, p.max_times + 1)):
        box_w, box_h = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
        x0 = int(rng.integers(margin, max(margin, width - margin - box_w) + 1))
        y0 = int(rng.integers(margin, max(margin, height - margin - box_h) + 1))
        mask[y0 : y0 + box_h, x0 : x0 + box_w] = True
    return mask


def sample_preset(rng: np.random.Generator, preset: MaskPreset, shape: tuple[int, int]) -> np.ndarray:
    """Boolean H×W hole mask from `preset`, pixel sizes scaled from 256 px to `shape`."""
    # The geometric mean keeps the expected hole fraction of non-square masks equal to the square one.
    scale = math.sqrt(shape[0] * shape[1]) / _BASE_SIZE
    weights = np.array([w for w, _ in preset.kinds], dtype=np.float64)
    for _ in range(_MAX_REDRAWS):
        params = preset.kinds[rng.choice(len(weights), p=weights / weights.sum())][1]
        draw = draw_strokes if isinstance(params, Strokes) else draw_boxes
        hole = draw(rng, shape, params, scale)
        if hole.mean() <= preset.max_hole:
            return hole
    raise RuntimeError(f"no mask with hole fraction <= {preset.max_hole} in {_MAX_REDRAWS} draws for {shape}")


class MaskGenerator:
    """Seeded LaMa-style masks: `MaskGenerator("train", 256)(seed)` -> 1×H×W float32 in {0, 1}.

    With probability `p_full` the whole image is hole (the decoder gets no known pixels), so the
    model also learns plain reconstruction. The same seed always gives the same mask: validation
    uses the sample index, training a seed drawn from torch's (worker-seeded) RNG.
    """

    def __init__(self, preset: str = "train", size: int | tuple[int, int] = 256, p_full: float = 0.5):
        if preset not in PRESETS:
            raise ValueError(f"unknown mask preset {preset!r}; valid presets: {', '.join(PRESETS)}")
        if not 0.0 <= p_full <= 1.0:
            raise ValueError(f"p_full must be in [0, 1]; got {p_full}")
        shape = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
        if len(shape) != 2 or min(shape) < 16:
            raise ValueError(f"size must be an int or (H, W) with both sides >= 16; got {size!r}")
        self.preset_name = preset
        self.preset = PRESETS[preset]
        self.shape = (int(shape[0]), int(shape[1]))
        self.p_full = float(p_full)

    def __call__(self, seed: int) -> torch.Tensor:
        rng = np.random.default_rng(seed)
        if rng.random() < self.p_full:
            return torch.ones(1, *self.shape)
        hole = sample_preset(rng, self.preset, self.shape)
        return torch.from_numpy(hole.astype(np.float32))[None]

    def __repr__(self) -> str:
        return f"MaskGenerator(preset={self.preset_name!r}, size={self.shape}, p_full={self.p_full})"


# What Pillow raises for corrupt, truncated, non-image and oversized files (as datasets._DECODE_ERRORS).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error, Image.DecompressionBombError,
                  Image.DecompressionBombWarning)
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")


def load_mask(path: str | os.PathLike, size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """Read a mask image (white = hole) as a 1×H×W float32 tensor in {0, 1}.

    Grayscale, RGB, RGBA and 16-bit files are accepted; soft values are binarised at 0.5.
    Transparent pixels count as known (painted strokes on an empty layer). `size` (int or (H, W))
    resizes with nearest neighbour so the mask stays binary.
    """
    try:
        with warnings.catch_warnings():
            # As load_image: a decompression bomb (even one Pillow only warns about) is refused.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            values = _mask_values(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"mask file not found: {path}") from None
    except _DECODE_ERRORS as e:
        raise ValueError(f"cannot read mask {path}: {type(e).__name__}: {e}") from e
    hole = values >= 0.5
    if size is not None:
        height, width = (size, size) if isinstance(size, int) else size
        hole = np.asarray(Image.fromarray(hole).resize((width, height), Image.NEAREST))
    return torch.from_numpy(hole.astype(np.float32))[None]


def _mask_values(path) -> np.ndarray:
    """H×W float64 in [0, 1] (white = 1); transparent pixels are 0."""
    with Image.open(path) as im:
        im.load()
        if im.mode in _SIXTEEN_BIT:
            values = np.asarray(im, dtype=np.float64) / 65535.0
        elif im.mode in _ALPHA or "transparency" in im.info:
            black = Image.new("RGBA", im.size, (0, 0, 0, 255))
            values = np.asarray(Image.alpha_composite(black, im.convert("RGBA")).convert("L")) / 255.0
        else:
            values = np.asarray(im.convert("L")) / 255.0
    return values
