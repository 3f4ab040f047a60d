"""Tiled decoding (`decode(..., tile=...)`, ldm_asym/models/tiling.py): arguments, tile layout,
blend weights, crops of image and mask, agreement with the untiled decode, seams, known pixels."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_VAE, masks, perturb_

from ldm_asym.models import AsymmetricAutoencoder, Tiling
from ldm_asym.models.tiling import _cores, as_tiling, tile_starts, tiled_decode

pytestmark = pytest.mark.usefixtures("one_thread")

F8 = 8
# Tiled vs untiled PSNR (dB, [-1, 1] range) floors for the random-init tiny model below at tile 12,
# overlap 4: measured 23.8 (image + mask) / 26.1 (plain); seeds 1, 2: 24.3 / 27.1, 25.8 / 30.4.
# A random-init figure, and almost all of it is per-tile GroupNorm statistics: the same decoder
# without its norms (and attention) agrees to 74 dB (test_tiling_without_statistics_is_near_exact).
PSNR_FLOOR = {"masked": 22.0, "plain": 24.0}
# The same with Tiling(12, 4, stats="image"): measured 27.4 / 28.5 (per tile: 23.8 / 26.1);
# seeds 1, 2: 28.6 / 29.5 (24.3 / 27.1) and 31.1 / 33.1 (25.8 / 30.4).
IMAGE_STATS_PSNR_FLOOR = {"masked": 25.5, "plain": 26.5}


def psnr(a, b):
    return float(10 * torch.log10(4 / F.mse_loss(a, b)))


def _model(blend="add", seed=0):
    torch.manual_seed(seed)
    model = AsymmetricAutoencoder(vae_config=dict(TINY_VAE),
                                  decoder=dict(up_widths=[32, 32, 32, 32], resnets_per_level=1, blend=blend))
    return perturb_(model, seed).eval()


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def inputs():
    """Batch 2, latent 20x28 (neither a multiple of the tile 12 nor of its stride), image, masks."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 4, 20, 28, generator=g)
    image = torch.rand(2, 3, 160, 224, generator=g) * 2 - 1
    mask = torch.cat([masks(1, 160, 224)["rect"], masks(1, 160, 224, seed=1)["soft"]])
    return z, image, mask


# ---------------------------------------------------------------------- arguments
@pytest.mark.parametrize("tile,match", [
    (0, "tile size must be a positive int"),
    (-4, "tile size must be a positive int"),
    (True, "tile must be None, an int"),
    (1.5, "tile must be None, an int"),
    ("16", "tile must be None, an int"),
    ((16, 4), "tile must be None, an int"),
    ({"size": 16, "overlap": 16}, r"tile overlap must be an int in \[0, size=16\)"),
    ({"size": 16, "overlap": -1}, "tile overlap must be an int"),
    ({"size": 16, "overlap": 2.0}, "tile overlap must be an int"),
    ({"size": 16.0}, "tile size must be a positive int"),
    ({"overlap": 4}, "tile needs a 'size'"),
    ({"size": 16, "stride": 8}, r"tile has unknown keys \['stride'\]"),
    ({"size": 16, "stats": "global"}, r"tile stats must be one of \('image', 'tile'\); got 'global'"),
    ({"size": 16, "stats": None}, "tile stats must be one of"),
])
def test_bad_tile_arguments(model, tile, match):
    z = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match=match):
        model.decode(z, tile=tile)


def test_tile_argument_forms():
    assert as_tiling(None) is None
    assert as_tiling(16) == Tiling(16, 4) == as_tiling({"size": 16}) == as_tiling(Tiling(16))
    assert as_tiling({"size": 16, "overlap": 0}) == Tiling(16, 0)
    assert as_tiling(16).stats == "tile"  # the int shorthand: per-tile statistics, as before
    assert as_tiling({"size": 16, "stats": "image"}) == Tiling(16, 4, stats="image")
    with pytest.raises(ValueError, match="tile stats must be one of"):
        Tiling(16, 4, "Image")
    assert as_tiling(np.int64(16)) == Tiling(16, 4) and type(as_tiling(np.int64(16)).size) is int
    with pytest.raises(ValueError, match="tile overlap"):
        Tiling(8, 8)


@pytest.mark.parametrize("length,size,overlap", [(8, 8, 2), (9, 8, 2), (16, 8, 0), (20, 12, 4), (28, 12, 4),
                                                 (101, 16, 4), (50, 9, 7), (64, 64, 16), (257, 64, 16)])
def test_tile_starts(length, size, overlap):
    starts = tile_starts(length, size, overlap)
    covered = [s + i for s, (lo, hi) in zip(starts, _cores(starts, min(size, length), length)) for i in range(lo, hi)]
    assert covered == list(range(length))  # cores (image-wide statistics) count every latent pixel once
    assert starts[0] == 0 and starts[-1] == length - size  # full-size tiles covering the axis
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert all(0 < g <= size - overlap for g in gaps)  # overlaps at least as asked
    assert max(gaps, default=0) - min(gaps, default=0) <= 1  # evenly spread
    assert len(starts) == max(1, math.ceil((length - overlap) / (size - overlap)))  # no more tiles than needed


# ---------------------------------------------------------------------- tiling itself, on known functions
def _local_decoder(z, image, mask):
    """A decoder whose every output pixel depends only on the inputs at that pixel: tiling is exact."""
    out = F.interpolate(z[:, :3], scale_factor=F8, mode="nearest")
    return out if image is None else out + (1 - mask) * image * 3 + mask


@pytest.mark.parametrize("hw,tiling", [((20, 28), Tiling(12, 4)), ((13, 7), Tiling(4, 1)), ((16, 16), Tiling(8, 0)),
                                       ((11, 30), Tiling(9, 7)), ((5, 40), Tiling(16, 8))])
@pytest.mark.parametrize("conditioned", [True, False])
def test_tiling_is_exact_for_a_local_decoder(hw, tiling, conditioned):
    """Blend weights sum to 1 at every pixel (three-way overlaps and odd sizes included), and every
    tile gets the image and mask pixels under its latent window: an offset crop breaks equality."""
    g = torch.Generator().manual_seed(0)
    h, w = hw
    z = torch.randn(2, 4, h, w, generator=g)
    image = torch.rand(2, 3, h * F8, w * F8, generator=g) * 2 - 1 if conditioned else None
    mask = (torch.rand(2, 1, h * F8, w * F8, generator=g) > 0.5).float() if conditioned else None
    calls = []

    def decode(*args):
        calls.append(args)
        return _local_decoder(*args)

    out = tiled_decode(decode, z, image, mask, tiling, F8)
    assert out.shape == (2, 3, h * F8, w * F8)
    torch.testing.assert_close(out, _local_decoder(z, image, mask), atol=1e-5, rtol=0)
    assert len(calls) > 1 and all(c[0].shape[-2:] == (min(h, tiling.size), min(w, tiling.size)) for c in calls)


def test_offset_mask_crop_is_caught():
    """The check above has teeth: a mask tile taken one latent pixel to the left breaks it."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, 20, 28, generator=g)
    image = torch.rand(1, 3, 160, 224, generator=g) * 2 - 1
    mask = (torch.rand(1, 1, 160, 224, generator=g) > 0.5).float()
    shifted = torch.roll(mask, F8, dims=-1)  # shifted[x] = mask[x - 8]
    windows = [(r * F8, c * F8) for r in tile_starts(20, 12, 4) for c in tile_starts(28, 12, 4)]

    def decode(zt, it, mt):  # tiles arrive row by row; swap in the offset mask crop
        y, x = windows.pop(0)
        return _local_decoder(zt, it, shifted[..., y:y + mt.shape[-2], x:x + mt.shape[-1]])

    out = tiled_decode(decode, z, image, mask, Tiling(12, 4), F8)
    assert (out - _local_decoder(z, image, mask)).abs().max() > 0.5


# ---------------------------------------------------------------------- the real decoder
def test_one_tile_is_the_untiled_decode(model, inputs):
    z, image, mask = inputs
    with torch.no_grad():
        assert torch.equal(model.decode(z, image, mask, tile=28), model.decode(z, image, mask))
        assert torch.equal(model.decode(z, tile=Tiling(64, 8)), model.decode(z))


@pytest.mark.parametrize("blend", ["add", "none"])
def test_tiled_agrees_with_untiled(model, inputs, blend):
    z, image, mask = inputs
    m = model if blend == "add" else _model("none")
    with torch.no_grad():
        full, plain = m.decode(z, image, mask), m.decode(z)
        tiled, tiled_plain = m.decode(z, image, mask, tile=12), m.decode(z, tile=Tiling(12, 4))
    assert tiled.shape == full.shape and tiled.dtype == full.dtype
    assert psnr(tiled_plain, plain) >= PSNR_FLOOR["plain"]
    if blend == "none":  # image and mask are ignored, tiled as untiled
        assert torch.equal(tiled, tiled_plain)
    else:
        assert psnr(tiled, full) >= PSNR_FLOOR["masked"]
        assert psnr(tiled, full) > psnr(tiled, plain) + 3  # the image and mask were used


class _Identity(torch.nn.Module):
    def forward(self, h, *args, **kwargs):
        return h


def test_tiling_without_statistics_is_near_exact(inputs):
    """The decoder with its GroupNorms and mid-block attention (the only whole-image operations)
    replaced by identities: tiles then differ from the whole only at their borders (zero padding),
    which the ramps fade out: 74.3 dB measured. The image and mask matter here (plain decode vs
    conditioned: 28 dB), so a crop of image or mask in the wrong place would show."""
    m = _model(seed=1)
    m.decoder.mid_block.attentions[0] = _Identity()
    for module in list(m.decoder.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.GroupNorm):
                setattr(module, name, _Identity())
    z, image, mask = inputs
    with torch.no_grad():
        full, tiled = m.decode(z, image, mask), m.decode(z, image, mask, tile=Tiling(12, 4))
        assert psnr(m.decode(z), full) < 35
    assert psnr(tiled, full) >= 65


def _tile_windows(z, tiling):
    rows, cols = tile_starts(z.shape[-2], tiling.size, tiling.overlap), tile_starts(z.shape[-1], tiling.size,
                                                                                    tiling.overlap)
    return [(r, c) for r in rows for c in cols]


def test_each_tile_sees_its_own_image_and_mask(model, inputs):
    """Where a tile alone covers the output, the tiled decode equals a standalone decode of the
    latent tile with the image and mask cropped to its pixel window, and not one with the mask
    shifted by one latent pixel."""
    z, image, mask = inputs
    t = Tiling(12, 4)
    with torch.no_grad():
        out = model.decode(z, image, mask, tile=t)
        r, c = _tile_windows(z, t)[4]  # middle row / column of a 2 x 3 grid: r = 8, c = 8
        ys, xs = slice(r * F8, (r + 12) * F8), slice(c * F8, (c + 12) * F8)
        alone = model.decode(z[..., r:r + 12, c:c + 12], image[..., ys, xs], mask[..., ys, xs])
        shifted = model.decode(z[..., r:r + 12, c:c + 12], image[..., ys, xs],
                               mask[..., ys, slice(xs.start - F8, xs.stop - F8)])
    # Rows start at 0, 8 and columns at 0, 8, 16 (size 12): tile (1, 1) alone covers latent rows 12..20
    # (past row tile 0) and columns 12..16 (between column tiles 0 and 2); tile-local pixels below.
    assert _tile_windows(z, t) == [(0, 0), (0, 8), (0, 16), (8, 0), (8, 8), (8, 16)]
    own = (..., slice((12 - r) * F8, (20 - r) * F8), slice((12 - c) * F8, (16 - c) * F8))
    tile_out = out[..., ys, xs]
    torch.testing.assert_close(tile_out[own], alone[own], atol=1e-5, rtol=0)
    assert (tile_out[own] - shifted[own]).abs().max() > 0.1


def test_seams_are_blended(model, inputs):
    """Across an overlap the output fades from one tile's decode to the next one's (a convex mix
    with fractional weights), and is closer to the untiled decode there than a hard cut."""
    z, image, mask = inputs
    z, image, mask = z[:1, :, :12, :20], image[:1, :, :96, :160], mask[:1, :, :96, :160]
    t = Tiling(12, 4)  # columns 0..11 and 8..19: overlap = latent columns 8..11 = pixels 64..95
    with torch.no_grad():
        out, full = model.decode(z, image, mask, tile=t), model.decode(z, image, mask)
        a = model.decode(z[..., :12], image[..., :96], mask[..., :96])
        b = model.decode(z[..., 8:], image[..., 64:], mask[..., 64:])
    o, a_ov, b_ov = out[..., 64:96], a[..., 64:], b[..., :32]
    d = a_ov - b_ov
    weight = ((o - b_ov) * d).sum(dim=(0, 1, 2)) / (d * d).sum(dim=(0, 1, 2))  # per column: o = w a + (1 - w) b
    torch.testing.assert_close(o, weight * a_ov + (1 - weight) * b_ov, atol=1e-4, rtol=0)
    assert weight[0] > 0.95 and weight[-1] < 0.05 and (weight.diff() < 0).all()
    assert ((weight > 0.1) & (weight < 0.9)).sum() >= 16  # a fade, not a step
    hard = torch.cat([a[..., :80], b[..., 16:]], dim=-1)  # a cut in the middle of the overlap
    err = lambda x: (x - full)[..., 64:96].abs().mean()  # noqa: E731
    assert err(out) < 0.9 * err(hard)
    assert torch.equal(out[..., :64], a[..., :64]) and torch.equal(out[..., 96:], b[..., 32:])


def test_known_pixels_pass_through_tiles():
    """A decoder whose known pixels are the source by construction (the final blend feeds the image
    through: branch layer 0 = identity into channels 0..2, no final norm / activation, conv_out reads
    them back) keeps them exact when tiled: tiles put the right image under the right mask."""
    model = _model()
    dec = model.decoder
    with torch.no_grad():
        layer0 = dec.condition_encoder.layers[0]
        layer0.weight.zero_(), layer0.bias.zero_()
        dec.conv_out.weight.zero_(), dec.conv_out.bias.zero_()
        for ch in range(3):
            layer0.weight[ch, ch, 1, 1] = 1
            dec.conv_out.weight[ch, ch, 1, 1] = 1
    dec.conv_norm_out, dec.conv_act = torch.nn.Identity(), torch.nn.Identity()
    g = torch.Generator().manual_seed(5)
    z = torch.randn(1, 4, 20, 28, generator=g)
    image = torch.rand(1, 3, 160, 224, generator=g) * 2 - 1
    mask = masks(1, 160, 224, seed=2)["rect"]
    known = mask == 0
    with torch.no_grad():
        full, tiled = model.decode(z, image, mask), model.decode(z, image, mask, tile=Tiling(12, 4))
    err = lambda x: (x - image).abs().masked_select(known.expand_as(x)).max()  # noqa: E731
    assert err(full) < 1e-6 and err(tiled) < 1e-6


def test_known_pixel_error_of_a_random_decoder(model, inputs):
    """Random weights do not reproduce known pixels; tiling should not move their error much."""
    z, image, mask = inputs
    known = (mask < 0.5).expand_as(image)
    with torch.no_grad():
        full, tiled = model.decode(z, image, mask), model.decode(z, image, mask, tile=12)
    e_full, e_tiled = ((x - image).abs()[known].mean() for x in (full, tiled))
    assert abs(e_tiled - e_full) <= 0.05 * e_full


@pytest.mark.parametrize("stats", ["tile", "image"])
def test_tiles_follow_the_grad_mode(model, stats):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, 12, 20, generator=g, requires_grad=True)
    image, mask = torch.rand(1, 3, 96, 160, generator=g) * 2 - 1, masks(1, 96, 160)["rect"]
    t = Tiling(12, 4, stats)
    with torch.no_grad():
        assert not model.decode(z, image, mask, tile=t).requires_grad
    model.decode(z, image, mask, tile=t).square().mean().backward()
    assert z.grad is not None and (z.grad.abs().sum(dim=(0, 1, 2)) > 0).all()  # every latent column
    model.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------- image-wide GroupNorm statistics
class _PointwiseNormDecoder(torch.nn.Module):
    """Pixel-local except for its GroupNorms: one at latent resolution, one on a B x C x (h·w)
    flattened input (as the mid-block attention's), one at 2x: with image-wide statistics, tiling
    is exact; with per-tile ones it is not."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.mid, self.out = (torch.nn.Conv2d(4, 8, 1), torch.nn.Conv2d(8, 8, 1), torch.nn.Conv2d(8, 3, 1))
        self.norms = torch.nn.ModuleList(torch.nn.GroupNorm(4, 8) for _ in range(3))
        perturb_(self)

    def forward(self, z, image, mask):
        h = F.silu(self.norms[0](self.inp(z)))
        b, c, hh, ww = h.shape
        h = self.norms[1](h.flatten(2)).view(b, c, hh, ww) * 2 + h
        h = F.interpolate(self.mid(h), scale_factor=2, mode="nearest")
        h = F.silu(self.norms[2](h + h.square()))
        return F.interpolate(self.out(h), scale_factor=F8 // 2, mode="nearest")


@pytest.mark.parametrize("hw,tiling", [((20, 28), Tiling(12, 4)), ((13, 7), Tiling(4, 1)), ((11, 30), Tiling(9, 7))])
def test_image_stats_make_a_pointwise_decoder_exact(hw, tiling):
    """Each latent pixel enters every norm's statistics exactly once (overlaps split at their
    middle, three-way overlaps included), at every resolution, and the fixed statistics are used."""
    dec = _PointwiseNormDecoder()
    z = torch.randn(2, 4, *hw, generator=torch.Generator().manual_seed(1)) * 3 + 1
    with torch.no_grad():
        full = dec(z, None, None)
        image = tiled_decode(dec, z, None, None, Tiling(tiling.size, tiling.overlap, "image"), F8, list(dec.norms))
        per_tile = tiled_decode(dec, z, None, None, tiling, F8, list(dec.norms))
    torch.testing.assert_close(image, full, atol=2e-5, rtol=0)
    assert (per_tile - full).abs().max() > 0.05
    assert all("forward" not in n.__dict__ for n in dec.norms)


def test_image_stats_are_closer_to_untiled(model, inputs):
    """The real decoder: image-wide statistics beat per-tile ones by a clear margin (measured at
    tile 12/4: 27.4 vs 23.8 dB with image + mask, 28.5 vs 26.1 plain; the rest is the per-tile
    attention and zero padding at tile borders). Without the norm hooks both would be equal."""
    z, image, mask = inputs
    with torch.no_grad():
        full, plain = model.decode(z, image, mask), model.decode(z)
        per_tile = model.decode(z, image, mask, tile=Tiling(12, 4))
        wide = model.decode(z, image, mask, tile=Tiling(12, 4, stats="image"))
        wide_plain = model.decode(z, tile=Tiling(12, 4, stats="image"))
    assert psnr(wide, full) >= psnr(per_tile, full) + 2.5
    assert psnr(wide, full) >= IMAGE_STATS_PSNR_FLOOR["masked"]
    assert psnr(wide_plain, plain) >= IMAGE_STATS_PSNR_FLOOR["plain"]


# 6 tiles, 14 GroupNorms: 14 statistics passes of 6 decoder calls, then the decode pass
@pytest.mark.parametrize("fail_at", [2, 14 * 6 + 3])
def test_norm_hooks_are_removed(fail_at):
    """After a stats="image" decode, also one that raises, the decoder's GroupNorms are its own
    again: untiled outputs are bit-equal to before."""
    m = _model()
    g = torch.Generator().manual_seed(4)
    z = torch.randn(1, 4, 12, 20, generator=g)
    norms = [n for n in m.decoder.modules() if isinstance(n, torch.nn.GroupNorm)]
    calls = []

    def boom(module, args):
        calls.append(1)
        if len(calls) == fail_at:
            raise RuntimeError("boom")

    with torch.no_grad():
        before = m.decode(z)
        m.decode(z, tile=Tiling(8, 2, stats="image"))
        assert all("forward" not in n.__dict__ for n in norms)
        assert torch.equal(m.decode(z), before)
        handle = m.decoder.conv_in.register_forward_pre_hook(boom)
        try:
            with pytest.raises(RuntimeError, match="boom"):
                m.decode(z, tile=Tiling(8, 2, stats="image"))
        finally:
            handle.remove()
        assert all("forward" not in n.__dict__ for n in norms)
        assert torch.equal(m.decode(z), before)


def test_memory_benchmark_smoke(capsys):
    """benchmarks/tiled_memory.py end to end on the tiny variant, in-process (its subprocess runner
    only adds a fresh interpreter per measurement); the 128² untiled decode is predicted and skipped."""
    from benchmarks.tiled_memory import main, probe

    argv = ["--variant", "tiny", "--size", "64", "128", "--tile", "4", "--overlap", "1", "--threads", "1",
            "--untiled-max-s", "0"]
    assert main(argv, runner=probe) == 0
    out = capsys.readouterr().out
    assert "| 64² | untiled | 1 |" in out and "| 64² | tiled 4/1 | 9 |" in out
    assert "| 128² | untiled | – | not run: predicted" in out and "| 128² | tiled 4/1 | 25 |" in out


def test_accuracy_benchmark_smoke(capsys):
    """benchmarks/tiled_accuracy.py end to end on the tiny variant, without its FLOP count (~6 s
    under FlopCounterMode's Python dispatch): image-wide statistics agree better with untiled."""
    from benchmarks.tiled_accuracy import main

    assert main(["--variant", "tiny", "--size", "64", "--tile", "4", "--overlap", "1", "--threads", "1",
                 "--no-flops"]) == 0
    rows = [r.split(" | ") for r in capsys.readouterr().out.splitlines() if r.startswith("| image + mask | ")]
    by_stats = {r[1]: r for r in rows}
    assert set(by_stats) == {"untiled", "tile", "image"}
    assert float(by_stats["image"][2]) > float(by_stats["tile"][2])
