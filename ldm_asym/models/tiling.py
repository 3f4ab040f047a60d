"""Tiled decoding: decode a large latent in overlapping tiles and cross-fade the seams.

Why: the decoder's activations grow with the image (base decoder, one 2048² image: the branch
features alone are ~9 GB in fp32), and diffusers' `AsymmetricAutoencoderKL` has no tiled decode.
Decoding latent tiles one at a time bounds that memory by the tile size; the output is written
into one preallocated image as each tile finishes, so no list of decoded tiles is kept.

How (the approach of diffusers' `AutoencoderKL.tiled_decode`, reorganised): tiles overlap, and in
an overlap each pixel is a weighted mean of the tiles covering it, with weights that ramp from
~0 at a tile's inner edge to 1 over the overlap. The conditioning `image` and `mask` are cropped
with the latent tile (pixel window = latent window × downsample factor), so every tile sees
exactly the known pixels that lie under it.

Not bit-equal to an untiled decode: GroupNorm statistics and the mid-block attention are
computed per tile, and a tile's border pixels see zero padding instead of their neighbours.
The statistics dominate: with random weights, tiled vs untiled is ~16 dB PSNR for the base decoder
(1024², tile 64/16) but ~94 dB once its norms and attention are removed. Trained weights are needed
for a real tolerance; docs/benchmarks.md ("tiled decoding") and tests/test_tiling.py have figures.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Mapping

import torch


@dataclass(frozen=True)
class Tiling:
    """Tile size and overlap in **latent** pixels (× the VAE's downsample factor, 8, in image pixels).

    `overlap` defaults to size // 4 (diffusers' 0.25). Tiles are spread evenly, so real overlaps are
    at least `overlap` (more when the latent is not a whole number of strides). overlap = 0 gives
    hard seams where the latent divides evenly; it exists for comparison, not for use.
    """

    size: int = 64
    overlap: int | None = None

    def __post_init__(self):
        if not _is_int(self.size) or self.size < 1:
            raise ValueError(f"tile size must be a positive int (latent pixels); got {self.size!r}")
        object.__setattr__(self, "size", int(self.size))  # numpy ints too, as plain ints
        if self.overlap is None:
            object.__setattr__(self, "overlap", self.size // 4)
        ov = self.overlap
        if not _is_int(ov) or not 0 <= ov < self.size:
            raise ValueError(f"tile overlap must be an int in [0, size={self.size}) (latent pixels); got {ov!r}")
        object.__setattr__(self, "overlap", int(ov))

    def fits(self, h: int, w: int) -> bool:
        """A latent of h × w is one tile: decode it untiled."""
        return h <= self.size and w <= self.size


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)  # True is an int, not a size


def as_tiling(tile: None | int | Tiling | Mapping) -> Tiling | None:
    """`decode(tile=...)`'s argument: None, an int tile size, a `Tiling`, or {"size", "overlap"}."""
    if tile is None or isinstance(tile, Tiling):
        return tile
    if isinstance(tile, Mapping):
        unknown = set(tile) - {"size", "overlap"}
        if unknown:
            raise ValueError(f"tile has unknown keys {sorted(map(str, unknown))}; expected 'size' and 'overlap'")
        if "size" not in tile:
            raise ValueError("tile needs a 'size' (latent pixels)")
        return Tiling(**tile)
    if _is_int(tile):
        return Tiling(tile)
    raise ValueError(f"tile must be None, an int (latent tile size), a Tiling or a dict with 'size' and "
                     f"'overlap'; got {type(tile).__name__} {tile!r}")


def tile_starts(length: int, size: int, overlap: int) -> list[int]:
    """Start of each tile along one latent axis: full-size tiles, evenly spread, overlaps >= `overlap`.

    Why evenly spread rather than diffusers' fixed stride with a short last tile: a tile of a few
    latent pixels has poor GroupNorm statistics and its own seam artefacts; equal tiles avoid that
    (and keep one tile shape, which cuDNN autotuning and torch.compile like).
    """
    if length <= size:
        return [0]
    n = math.ceil((length - overlap) / (size - overlap))  # fewest tiles whose stride is <= size - overlap
    span = length - size
    return [(k * span + (n - 1) // 2) // (n - 1) for k in range(n)]  # round(k * span / (n - 1))


def _axis_weights(starts: list[int], size: int, length: int, factor: int) -> list[torch.Tensor]:
    """Per tile, its 1D blend weight over its pixel window; at every pixel the weights sum to 1.

    A tile's weight rises over its overlap with the previous tile and falls over the one with the
    next as a raised cosine, sin²(π/2 · t), t = (pixel + 0.5) / overlap. Why cosine, not linear:
    it is ~0 at the tile's very edge, where zero padding and missing context make a tile worst,
    and flat where it meets 1, so the fade has no kink. Two tiles' ramps meet as sin² + cos² = 1;
    dividing by the sum keeps that exact also where three tiles overlap (overlap > size / 2).
    """
    px = size * factor
    pos = torch.arange(px, dtype=torch.float64) + 0.5
    raw = []
    for k, s in enumerate(starts):
        w = torch.ones(px, dtype=torch.float64)
        if k > 0:  # rising over the overlap with the previous tile
            ov = (starts[k - 1] + size - s) * factor
            w *= torch.where(pos < ov, torch.sin(0.5 * math.pi * pos / ov) ** 2, 1.0)
        if k + 1 < len(starts):  # falling over the overlap with the next tile
            ov = (s + size - starts[k + 1]) * factor
            w *= torch.where(px - pos < ov, torch.sin(0.5 * math.pi * (px - pos) / ov) ** 2, 1.0)
        raw.append(w)
    total = torch.zeros(length * factor, dtype=torch.float64)
    for s, w in zip(starts, raw):
        total[s * factor:s * factor + px] += w
    return [w / total[s * factor:s * factor + px] for s, w in zip(starts, raw)]


def tiled_decode(
    decode: Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor | None], torch.Tensor],
    z: torch.Tensor,
    image: torch.Tensor | None,
    mask: torch.Tensor | None,
    tiling: Tiling,
    factor: int,
) -> torch.Tensor:
    """Decode `z` (B×C×h×w) tile by tile with `decode(z_tile, image_tile, mask_tile)` -> B×3×(h·f)×(w·f).

    Inputs are assumed checked (`AsymmetricAutoencoder.decode` does it once, on the whole tensors).
    Each tile runs under the caller's grad mode: with autograd on, every tile's graph is kept for
    backward, so memory is bounded only under `torch.no_grad()` / `inference_mode()`.
    """
    h, w = z.shape[-2:]
    th, tw = min(tiling.size, h), min(tiling.size, w)
    rows, cols = tile_starts(h, th, tiling.overlap), tile_starts(w, tw, tiling.overlap)
    row_w, col_w = _axis_weights(rows, th, h, factor), _axis_weights(cols, tw, w, factor)
    out = None
    for y0, wy in zip(rows, row_w):
        ys = slice(y0 * factor, (y0 + th) * factor)
        for x0, wx in zip(cols, col_w):
            xs = slice(x0 * factor, (x0 + tw) * factor)
            z_tile = z[..., y0:y0 + th, x0:x0 + tw]
            if image is None:
                tile = decode(z_tile, None, None)
            else:  # the known pixels under this latent tile, nothing else
                tile = decode(z_tile, image[..., ys, xs], mask[..., ys, xs])
            if out is None:  # sized from the first tile: channels, dtype (autocast) and device as decoded
                out = tile.new_zeros(*tile.shape[:-2], h * factor, w * factor)
            weight = (wy[:, None] * wx[None, :]).to(device=tile.device, dtype=tile.dtype)
            out[..., ys, xs].addcmul_(tile, weight)  # in place: no second full-size image
            del tile  # free this tile's activations before the next one is decoded
    return out
