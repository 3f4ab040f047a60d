import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ldm_asym.data.masks import PRESETS, Boxes, MaskGenerator, Strokes, draw_boxes, draw_strokes, load_mask


def _masks(preset, n, size=256, p_full=0.0):
    gen = MaskGenerator(preset, size, p_full=p_full)
    return torch.stack([gen(seed) for seed in range(n)])


def _erosion_survival(masks, k):
    """Fraction of hole pixels whose k×k neighbourhood is all hole: ~0 for strokes thinner than k."""
    eroded = -F.max_pool2d(-masks, k, stride=1, padding=k // 2)
    return (eroded.sum() / masks.sum()).item()


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_shape_dtype_binary_and_deterministic(preset):
    gen = MaskGenerator(preset, 256)
    for seed in range(6):
        m = gen(seed)
        assert m.shape == (1, 256, 256) and m.dtype == torch.float32
        assert set(m.unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(m, gen(seed))
        assert torch.equal(m, MaskGenerator(preset, 256)(seed))  # a fresh generator too: no hidden state
    distinct = {MaskGenerator(preset, 256, p_full=0)(s).numpy().tobytes() for s in range(6)}
    assert len(distinct) == 6


def test_p_full_frequency():
    def n_full(p):
        gen = MaskGenerator("thick", 64, p_full=p)
        return sum(bool(gen(s).min() == 1) for s in range(400))

    assert 0.4 * 400 <= n_full(0.5) <= 0.6 * 400
    assert n_full(0.0) == 0
    assert n_full(1.0) == 400


def test_preset_coverage_and_thickness():
    n = 80
    masks = {p: _masks(p, n) for p in PRESETS}
    frac = {p: m.mean(dim=(1, 2, 3)) for p, m in masks.items()}
    # LaMa's eval sets cap the hole at half the image; the training masks are uncapped.
    for p in ("thin", "medium", "thick"):
        assert frac[p].max() <= 0.5
    assert (frac["train"] > 0.5).float().mean() > 0.2
    assert 0.3 < frac["train"].mean() < 0.5
    for p in ("thin", "medium", "thick"):
        assert 0.15 < frac[p].mean() < 0.4, (p, frac[p].mean())
    assert frac["thick"].mean() > frac["medium"].mean()
    assert frac["train"].min() > 0  # at least one stroke or box every time
    # Brush widths: thin 5-14 px, medium 5-54, thick 5-104 (boxes 30-150).
    survival = {p: _erosion_survival(masks[p], 15) for p in ("thin", "medium", "thick")}
    assert survival["thin"] < 0.1 < survival["medium"] < survival["thick"], survival


def test_single_stroke_geometry_matches_cv2_line():
    # One segment of fixed length and width: a w-wide bar plus round caps, as cv2.line draws it.
    length, width = 100, 20
    p = Strokes(min_times=1, max_times=1, max_len=1, max_width=1, max_vertex=1, min_len=length, min_width=width)
    areas = [draw_strokes(np.random.default_rng(s), (1024, 1024), p).sum() for s in range(20)]
    expected = length * width + math.pi * (width / 2) ** 2
    assert max(areas) == pytest.approx(expected, rel=0.06)
    assert all(a <= expected * 1.06 for a in areas)


def test_boxes_are_rectangles_within_margin():
    p = Boxes(min_times=1, max_times=1, bbox_min_size=30, bbox_max_size=150, margin=10)
    sides = []
    for s in range(60):
        hole = draw_boxes(np.random.default_rng(s), (256, 256), p)
        ys, xs = np.nonzero(hole)
        h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        assert hole.sum() == h * w  # filled axis-aligned box
        assert ys.min() >= 10 and xs.min() >= 10 and ys.max() <= 245 and xs.max() <= 245
        sides += [h, w]
    assert 30 <= min(sides) < 50 and 130 < max(sides) <= 150
    # Exact inclusive bounds: sides 40..44 and a 10 px margin reached on both ends of a 64 px canvas.
    p = Boxes(min_times=1, max_times=1, bbox_min_size=40, bbox_max_size=44, margin=10)
    heights, widths, lows, highs = set(), set(), set(), set()
    for s in range(200):
        ys, xs = np.nonzero(draw_boxes(np.random.default_rng(s), (64, 64), p))
        heights.add(ys.max() - ys.min() + 1)
        widths.add(xs.max() - xs.min() + 1)
        lows.add(min(ys.min(), xs.min()))
        highs.add(max(ys.max(), xs.max()))
    assert heights == widths == {40, 41, 42, 43, 44}
    assert min(lows) == 10 and max(highs) == 53


def test_size_scaling_keeps_coverage():
    small = _masks("train", 50, 256).mean().item()
    large = _masks("train", 50, 512)
    assert large.shape == (50, 1, 512, 512)
    assert large.mean().item() == pytest.approx(small, abs=0.06)
    # Brush widths scale too: twice-as-wide thin strokes at 512 px survive a 15×15 erosion far more often.
    thin512 = _masks("thin", 30, 512)
    assert _erosion_survival(thin512, 15) > 2 * _erosion_survival(_masks("thin", 30, 256), 15)


def test_non_square():
    gen = MaskGenerator("train", (96, 320), p_full=0)
    masks = torch.stack([gen(s) for s in range(40)])
    assert masks.shape == (40, 1, 96, 320)
    assert 0.1 < masks.mean() < 0.6
    assert torch.equal(MaskGenerator("thin", (96, 320), p_full=1.0)(0), torch.ones(1, 96, 320))


def test_bad_arguments():
    with pytest.raises(ValueError, match="thin.*medium.*thick|train.*thin"):
        MaskGenerator("huge")
    for p in (-0.1, 1.5):
        with pytest.raises(ValueError, match="p_full"):
            MaskGenerator(p_full=p)
    with pytest.raises(ValueError, match="size"):
        MaskGenerator(size=8)
    with pytest.raises(ValueError, match="size"):
        MaskGenerator(size=(64, 64, 3))


def test_load_mask_modes(tmp_path):
    gray = np.zeros((20, 30), np.uint8)
    gray[:, 10:] = 200  # hole
    gray[:, 20:] = 100  # soft value below 0.5: known
    gray[0, 0] = 128  # just above 0.5: hole
    Image.fromarray(gray).save(tmp_path / "gray.png")
    expected = np.zeros((20, 30), np.float32)
    expected[:, 10:20] = 1
    expected[0, 0] = 1
    m = load_mask(tmp_path / "gray.png")
    assert m.shape == (1, 20, 30) and m.dtype == torch.float32
    assert np.array_equal(m[0].numpy(), expected)

    Image.fromarray(np.stack([gray] * 3, -1)).save(tmp_path / "rgb.png")
    assert np.array_equal(load_mask(tmp_path / "rgb.png")[0].numpy(), expected)

    # Painted white strokes on a transparent layer: transparent = known even where RGB is white.
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[:, 10:20, 3] = 255
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    painted = np.zeros((20, 30), np.float32)
    painted[:, 10:20] = 1
    assert np.array_equal(load_mask(tmp_path / "rgba.png")[0].numpy(), painted)

    sixteen = np.zeros((20, 30), np.uint16)
    sixteen[:, 15:] = 40000  # 0.61 of full scale: hole (a clipping convert() would also say hole ...)
    sixteen[:, 25:] = 20000  # ... but 0.31 must stay known, not clip to 255
    Image.fromarray(sixteen).save(tmp_path / "sixteen.png")
    m16 = load_mask(tmp_path / "sixteen.png")[0].numpy()
    assert m16[:, :15].sum() == 0 and m16[:, 15:25].all() and m16[:, 25:].sum() == 0

    resized = load_mask(tmp_path / "gray.png", size=(40, 60))
    assert np.array_equal(resized[0].numpy(), np.kron(expected, np.ones((2, 2), np.float32)))  # nearest
    assert load_mask(tmp_path / "gray.png", size=16).shape == (1, 16, 16)


def test_load_mask_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_mask(tmp_path / "missing.png")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match="notes.png"):
        load_mask(tmp_path / "notes.png")
