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

Not bit-equal to an untiled decode: by default (`stats="tile"`) GroupNorm statistics are computed
per tile, the mid-block attention attends within each tile only (the untiled decoder's is global
over the latent; tiled, it stays per tile in both modes), and a tile's border pixels see zero
padding instead of their neighbours. The statistics dominate: with random weights, tiled vs
untiled is ~16 dB PSNR for the base decoder (1024², tile 64/16) but ~94 dB once its norms and
attention are removed.

`stats="image"` gives every GroupNorm (resnets, the attention's, conv_norm_out) its image-wide
per-sample, per-group statistics, with memory still bounded by one tile: statistics passes run
over all tiles, one per GroupNorm in the order the decoder reaches them, each cut short at that
norm (`_StopDecode`), the norms before it already fixed. Each pass accumulates the norm's input
over every tile's core (the tile minus half of each overlap, so each latent pixel counts once).
The norms' statistics are thus exactly those of a decode that is tiled only in its attention
and padding. Why sequential rather than iterating whole passes (every norm's statistics
estimated from a pass with per-tile or previous estimates upstream): that does not converge
within a few passes for the random-weight decoders here (tiny model: worse than per-tile after
one pass, diverging after two), and decoding a downscaled latent for the statistics was worse
still (4 dB); a norm's statistics are only right once those of every norm before it are.
Cost: one pass per GroupNorm, each as far as its norm (and the conditioning branch's
full-resolution convs in every pass past the mid-block): ~15× the FLOPs of a per-tile tiled
decode for the base decoder (30 GroupNorms) with image + mask, 12× plain (docs/benchmarks.md),
hence not the default. Trained weights are needed for a real tolerance; docs/benchmarks.md
("tiled decoding") and tests/test_tiling.py have figures.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

STATS_MODES = ("image", "tile")


@dataclass(frozen=True)
class Tiling:
    """Tile size and overlap in **latent** pixels (× the VAE's downsample factor, 8, in image pixels).

    `overlap` defaults to size // 4 (diffusers' 0.25). Tiles are spread evenly, so real overlaps are
    at least `overlap` (more when the latent is not a whole number of strides). overlap = 0 gives
    hard seams where the latent divides evenly; it exists for comparison, not for use.

    `stats`: "tile" (default, and what an int tile size means) normalises each tile with its own
    GroupNorm statistics, as diffusers' tiled decoders do; "image" uses image-wide statistics,
    much closer to the untiled decode but several times slower (module docstring).
    """

    size: int = 64
    overlap: int | None = None
    stats: str = "tile"

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
        if not isinstance(self.stats, str) or self.stats not in STATS_MODES:
            raise ValueError(f"tile stats must be one of {STATS_MODES}; got {self.stats!r}")

    def fits(self, h: int, w: int) -> bool:
        """A latent of h × w is one tile: decode it untiled."""
        return h <= self.size and w <= self.size


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)  # True is an int, not a size


def as_tiling(tile: None | int | Tiling | Mapping) -> Tiling | None:
    """`decode(tile=...)`'s argument: None, an int tile size, a `Tiling`, or {"size", "overlap", "stats"}."""
    if tile is None or isinstance(tile, Tiling):
        return tile
    if isinstance(tile, Mapping):
        unknown = set(tile) - {"size", "overlap", "stats"}
        if unknown:
            raise ValueError(f"tile has unknown keys {sorted(map(str, unknown))}; expected 'size', 'overlap', 'stats'")
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


def _cores(starts: list[int], size: int, length: int) -> list[tuple[int, int]]:
    """Per tile, its core along one axis, tile-local: the tiles' cores partition [0, length), each
    overlap split at its middle, so every latent pixel is counted in exactly one tile's core."""
    cuts = [0] + [(a + size + b) // 2 for a, b in zip(starts, starts[1:])] + [length]
    return [(lo - s, hi - s) for s, lo, hi in zip(starts, cuts, cuts[1:])]


class _StopDecode(Exception):
    """Raised by a statistics pass once its GroupNorm has seen the tile: the rest is not needed."""


class _ImageStats:
    """Image-wide GroupNorm statistics for tiled decoding, found one GroupNorm at a time.

    While installed (`with stats.installed():`), each GroupNorm in `norms` runs through `_forward`.
    A norm whose image-wide statistics are known (`fixed`) normalises with them. The first one
    reached that is not known yet is the pass's target: with `collect` on, it adds the per-sample,
    per-group mean and variance of its input over the current tile's core (`core`: latent pixels,
    scaled to the layer's resolution) to a running estimate (Chan's parallel update, float64) and
    stops the tile (`_StopDecode`); after the last tile, `finish_pass` fixes it. `installed` shadows
    each module's `forward` with an instance attribute and deletes it in a `finally`, so the modules
    are untouched afterwards, also when a tile raises.
    """

    def __init__(self, norms):
        self.norms = list(norms)
        self.collect = False
        self.core = None  # (tile h, tile w, (y0, y1), (x0, x1)) in latent pixels, tile-local
        self.fixed: dict = {}  # id(module) -> (mean, var), each B x G, float64
        self._acc: dict = {}

    @property
    def done(self) -> bool:
        return len(self.fixed) == len({id(m) for m in self.norms})

    @contextlib.contextmanager
    def installed(self):
        patched = []
        try:
            for m in self.norms:
                if "forward" in m.__dict__:
                    raise RuntimeError(f"{type(m).__name__} already has its forward replaced; not nesting hooks")
                m.forward = functools.partial(self._forward, m)
                patched.append(m)
            yield self
        finally:
            for m in patched:
                m.__dict__.pop("forward", None)

    def finish_pass(self) -> bool:
        """This pass's target gets its image-wide statistics; False when no tile reached a new norm."""
        for k, (n, mean, m2) in self._acc.items():
            self.fixed[k] = (mean, m2 / n)
        found, self._acc = bool(self._acc), {}
        return found

    def _add(self, m: nn.GroupNorm, x: torch.Tensor) -> None:
        th, tw, (y0, y1), (x0, x1) = self.core
        b, c = x.shape[:2]
        if x.ndim == 3:  # attention's GroupNorm sees B x C x (h·w), flattened row-major
            s = math.isqrt(x.shape[-1] // (th * tw))
            x = x.reshape(b, c, th * s, tw * s)
        if x.ndim != 4 or x.shape[-2] % th or x.shape[-1] % tw or x.shape[-2] // th != x.shape[-1] // tw:
            raise RuntimeError(f"GroupNorm input {tuple(x.shape)} is not a whole multiple of the {th}x{tw} tile")
        s = x.shape[-2] // th
        g = m.num_groups
        core = x.reshape(b, g, c // g, *x.shape[-2:])[..., y0 * s:y1 * s, x0 * s:x1 * s]
        var_t, mean_t = torch.var_mean(core.float(), dim=(2, 3, 4), correction=0)
        n_t = core[0, 0].numel()
        mean_t, m2_t = mean_t.double(), var_t.double() * n_t
        if id(m) not in self._acc:
            self._acc[id(m)] = (n_t, mean_t, m2_t)
            return
        n, mean, m2 = self._acc[id(m)]
        delta, n_new = mean_t - mean, n + n_t
        self._acc[id(m)] = (n_new, mean + delta * (n_t / n_new), m2 + m2_t + delta.square() * (n * n_t / n_new))

    def _forward(self, m: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        if id(m) not in self.fixed:
            if not self.collect:  # cannot happen after a complete set of passes
                raise RuntimeError("a GroupNorm without image-wide statistics in the decode pass")
            with torch.no_grad():
                self._add(m, x)
            raise _StopDecode
        mean, var = self.fixed[id(m)]  # B x G
        b, c, g = x.shape[0], x.shape[1], m.num_groups
        scale = torch.rsqrt(var + m.eps).repeat_interleave(c // g, dim=1)  # B x C
        shift = -mean.repeat_interleave(c // g, dim=1) * scale
        if m.affine:
            scale, shift = scale * m.weight.double(), shift * m.weight.double() + m.bias.double()
        per_channel = (b, c) + (1,) * (x.ndim - 2)
        # x · scale + shift in one kernel: GroupNorm with the fixed statistics, affine folded in.
        return torch.addcmul(shift.to(x.dtype).view(per_channel), x, scale.to(x.dtype).view(per_channel))


def tiled_decode(
    decode: Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor | None], torch.Tensor],
    z: torch.Tensor,
    image: torch.Tensor | None,
    mask: torch.Tensor | None,
    tiling: Tiling,
    factor: int,
    norms: Sequence[nn.Module] = (),
) -> torch.Tensor:
    """Decode `z` (B×C×h×w) tile by tile with `decode(z_tile, image_tile, mask_tile)` -> B×3×(h·f)×(w·f).

    Inputs are assumed checked (`AsymmetricAutoencoder.decode` does it once, on the whole tensors).
    Each tile runs under the caller's grad mode: with autograd on, every tile's graph is kept for
    backward, so memory is bounded only under `torch.no_grad()` / `inference_mode()`.

    `tiling.stats == "image"` with `norms` (the decoder's GroupNorms): statistics passes first, one
    per GroupNorm in the order the decoder reaches them, each over all tiles under no_grad and cut
    short at its norm; then the decode pass normalises every tile with those statistics (constants
    for autograd: gradients differ from an untiled decode's through them).
    """
    h, w = z.shape[-2:]
    th, tw = min(tiling.size, h), min(tiling.size, w)
    rows, cols = tile_starts(h, th, tiling.overlap), tile_starts(w, tw, tiling.overlap)
    if tiling.stats == "tile" or not norms:
        return _decode_tiles(decode, z, image, mask, rows, cols, th, tw, factor)
    # Only the GroupNorms change: the mid-block attention still attends within each tile (every
    # token of a tile to every other of the same tile, none outside it), where the untiled decoder
    # attends over the whole latent. Its GroupNorm's statistics are image-wide like the others'.
    stats = _ImageStats(norms)
    row_cores, col_cores = _cores(rows, th, h), _cores(cols, tw, w)
    with stats.installed():
        with torch.no_grad():
            stats.collect = True
            while not stats.done:
                for (y0, yc), (x0, xc) in ((r, c) for r in zip(rows, row_cores) for c in zip(cols, col_cores)):
                    stats.core = (th, tw, yc, xc)
                    z_tile = z[..., y0:y0 + th, x0:x0 + tw]
                    ys, xs = slice(y0 * factor, (y0 + th) * factor), slice(x0 * factor, (x0 + tw) * factor)
                    try:
                        if image is None:
                            decode(z_tile, None, None)
                        else:
                            decode(z_tile, image[..., ys, xs], mask[..., ys, xs])
                    except _StopDecode:
                        pass
                if not stats.finish_pass():  # a norm in `norms` the decoder never calls
                    break
            stats.collect = False
        return _decode_tiles(decode, z, image, mask, rows, cols, th, tw, factor)


def _decode_tiles(decode, z, image, mask, rows, cols, th, tw, factor) -> torch.Tensor:
    h, w = z.shape[-2:]
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
