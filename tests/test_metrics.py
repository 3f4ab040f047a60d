"""Metrics against hand-computed values and skimage."""

import math

import numpy as np
import pytest
import torch

from ldm_asym.metrics import (
    PSNR_MAX_DB,
    MaskedLPIPS,
    boundary_band,
    hole_region,
    known_region,
    psnr,
    ssim,
    ssim_map,
    unmasked_error,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def from01(t):
    return t * 2 - 1


def rand_images(seed=0, b=2, h=32, w=32, noise=0.1):
    g = torch.Generator().manual_seed(seed)
    # Smooth-ish content so SSIM is not trivially ~0.
    base = torch.nn.functional.avg_pool2d(torch.rand(b, 3, h, w, generator=g), 5, 1, 2)
    x01 = base.clamp(0, 1)
    y01 = (x01 + noise * torch.randn(b, 3, h, w, generator=g)).clamp(0, 1)
    return from01(x01), from01(y01)


def square_mask(b=2, h=32, w=32, top=10, left=10, size=12):
    m = torch.zeros(b, 1, h, w)
    m[:, :, top : top + size, left : left + size] = 1
    return m


# ---------------------------------------------------------------------- regions
def test_soft_mask_binarised_at_half():
    m = torch.tensor([0.0, 0.2, 0.49, 0.5, 0.51, 1.0]).view(1, 1, 1, 6)
    assert known_region(m).flatten().tolist() == [1, 1, 1, 0, 0, 0]
    assert hole_region(m).flatten().tolist() == [0, 0, 0, 1, 1, 1]
    assert known_region(m).dtype == torch.float32


def test_boundary_band_square_hole_count():
    m = square_mask(b=1, size=12)
    for width in (2, 3):
        band = boundary_band(m, width=width)
        assert band.shape == m.shape
        assert set(band.unique().tolist()) <= {0.0, 1.0}
        assert band.sum().item() == (12 + 2 * width) ** 2 - (12 - 2 * width) ** 2 == 8 * 12 * width
    band = boundary_band(m, width=2)
    # Rows 8..23 / cols 8..23 (dilated square) minus rows/cols 12..19 (eroded square).
    expected = torch.zeros_like(m)
    expected[..., 8:24, 8:24] = 1
    expected[..., 12:20, 12:20] = 0
    assert torch.equal(band, expected)


def test_boundary_band_empty_for_uniform_masks_and_ignores_image_edge():
    assert boundary_band(torch.ones(2, 1, 16, 16), width=3).sum() == 0
    assert boundary_band(torch.zeros(2, 1, 16, 16), width=3).sum() == 0
    half = torch.zeros(1, 1, 32, 32)
    half[..., :16] = 1  # hole touches the image edge on three sides: only the x=16 seam is a boundary
    band = boundary_band(half, width=2)
    assert band.sum().item() == 4 * 32
    assert band[..., 14:18].sum().item() == 4 * 32
    # Soft masks are binarised first; (B, H, W) masks keep their shape.
    soft = half * 0.7 + 0.1  # 0.8 in the hole, 0.1 outside
    assert torch.equal(boundary_band(soft[:, 0], width=2), band[:, 0])


# ---------------------------------------------------------------------- PSNR / unmasked error
def test_psnr_constant_offset_hand_value():
    x01 = torch.full((2, 3, 8, 8), 0.3)
    y01 = x01 + 0.1  # MSE = 0.01 -> 20 dB
    p = psnr(from01(x01), from01(y01))
    assert p.shape == (2,)
    assert torch.allclose(p, torch.full((2,), 20.0), atol=1e-4)
    y01 = x01 + torch.tensor([0.1, 0.01]).view(2, 1, 1, 1)  # per image: 20 dB, 40 dB
    assert torch.allclose(psnr(from01(x01), from01(y01)), torch.tensor([20.0, 40.0]), atol=1e-3)


def test_psnr_identical_capped_and_clamped_to_unit_range():
    x, _ = rand_images(1)
    assert torch.equal(psnr(x, x), torch.full((2,), PSNR_MAX_DB))
    # Values outside [-1, 1] are clamped before comparing: 1.5 vs 1.0 is no error.
    a = torch.ones(1, 3, 4, 4)
    assert psnr(a, 1.5 * a).item() == PSNR_MAX_DB


def test_psnr_region_uses_only_region():
    x01 = torch.full((1, 3, 8, 8), 0.5)
    y01 = x01.clone()
    region = torch.zeros(1, 1, 8, 8)
    region[..., :4, :] = 1
    y01[..., :4, :] += 0.1  # in the region: 20 dB
    y01[..., 4:, :] -= 0.4  # outside: must not matter
    assert psnr(from01(x01), from01(y01), region).item() == pytest.approx(20.0, abs=1e-4)
    y01[..., 4:, :] += 0.2  # now -0.2 outside
    assert psnr(from01(x01), from01(y01), region).item() == pytest.approx(20.0, abs=1e-4)
    assert psnr(from01(x01), from01(y01)).item() < 20.0
    # Empty region: NaN (callers nanmean).
    assert math.isnan(psnr(from01(x01), from01(y01), torch.zeros(1, 1, 8, 8)).item())


def test_unmasked_error_hand_value_and_hole_ignored():
    x01 = torch.zeros(1, 3, 4, 4)
    y01 = torch.zeros(1, 3, 4, 4)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1  # top half hole -> 8 known pixels
    y01[:, 0, 2:, :] = 0.2  # known pixels, channel 0: error 0.04 each
    y01[:, :, :2, :] = 0.9  # hole: ignored
    ue = unmasked_error(from01(x01), from01(y01), mask)
    assert ue.shape == (1,)
    assert ue.item() == pytest.approx(8 * 0.04 / (8 * 3), rel=1e-5)
    assert unmasked_error(from01(x01), from01(y01), mask, reduction="sum").item() == pytest.approx(8 * 0.04, rel=1e-5)
    # Equal to 10^(-PSNR/10) on the known region.
    p = psnr(from01(x01), from01(y01), known_region(mask))
    assert 10 ** (-p.item() / 10) == pytest.approx(ue.item(), rel=1e-4)
    with pytest.raises(ValueError):
        unmasked_error(from01(x01), from01(y01), mask, reduction="max")


def test_unmasked_error_binarises_soft_masks():
    x, y = rand_images(2)
    g = torch.Generator().manual_seed(3)
    soft = torch.rand(2, 1, 32, 32, generator=g)
    hard = (soft >= 0.5).float()
    assert torch.equal(unmasked_error(x, y, soft), unmasked_error(x, y, hard))
    assert not torch.allclose(unmasked_error(x, y, soft), unmasked_error(x, y, soft * 0.0))
    # (B, H, W) masks work too.
    assert torch.equal(unmasked_error(x, y, hard[:, 0]), unmasked_error(x, y, hard))


# ---------------------------------------------------------------------- SSIM
def test_ssim_matches_skimage():
    from skimage.metrics import structural_similarity

    x, y = rand_images(4, h=32, w=40, noise=0.15)
    ours = ssim(x, y)
    assert ours.shape == (2,)
    x01 = ((x + 1) / 2).clamp(0, 1).numpy().astype(np.float64)
    y01 = ((y + 1) / 2).clamp(0, 1).numpy().astype(np.float64)
    for i in range(2):
        ref = structural_similarity(
            x01[i], y01[i], channel_axis=0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1
        )
        assert 0.1 < ref < 0.99
        assert ours[i].item() == pytest.approx(ref, abs=1e-5)


def test_ssim_identical_is_one_and_region_restricts():
    x, y = rand_images(5, h=32, w=48, noise=0.2)
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-6)
    left = torch.zeros(2, 1, 32, 48)
    left[..., :16] = 1
    base = ssim(x, y, left)
    # The map at a pixel depends on inputs within 5 px: changing columns >= 16 + 5 leaves the left region alone.
    y2 = y.clone()
    y2[..., 21:] = -y2[..., 21:]
    assert torch.allclose(ssim(x, y2, left), base, atol=1e-6)
    assert not torch.allclose(ssim(x, y2), ssim(x, y), atol=1e-3)
    # Hand check: mean of the valid map over the left region cropped by 5 px.
    m = ssim_map(x, y)[..., :, : 16 - 5].mean(dim=(1, 2, 3))
    assert torch.allclose(base, m, atol=1e-6)
    assert torch.allclose(ssim(x, y, torch.ones(2, 1, 32, 48)), ssim(x, y), atol=1e-6)
    # Only the 5-px border is hit: NaN.
    border = torch.zeros(2, 1, 32, 48)
    border[..., :5, :] = 1
    assert torch.isnan(ssim(x, y, border)).all()


# SSIM of the hand-written implementation that torchmetrics' map replaced (same inputs, fp32):
# (seed, h, w, noise, hole top/left/size) -> whole image, known region, hole region, per image.
PREVIOUS_SSIM = {
    (4, 32, 40, 0.15, 10, 10, 12): ([0.18184944987297058, 0.17867928743362427],
                                    [0.17495957016944885, 0.1823185831308365],
                                    [0.20653821527957916, 0.16563844680786133]),
    (9, 48, 40, 0.04, 20, 6, 20): ([0.7433900833129883, 0.7311959266662598],
                                   [0.7417920231819153, 0.7277951836585999],
                                   [0.7463463544845581, 0.737487256526947]),
}


@pytest.mark.parametrize("case", list(PREVIOUS_SSIM))
def test_ssim_on_torchmetrics_matches_the_previous_implementation(case):
    seed, h, w, noise, top, left, size = case
    x, y = rand_images(seed, h=h, w=w, noise=noise)
    m = square_mask(h=h, w=w, top=top, left=left, size=size)
    got = [ssim(x, y), ssim(x, y, known_region(m)), ssim(x, y, hole_region(m))]
    for value, old in zip(got, PREVIOUS_SSIM[case]):
        assert torch.allclose(value, torch.tensor(old), rtol=0, atol=1e-6)  # measured: identical in fp32


def test_psnr_whole_image_matches_torchmetrics():
    from torchmetrics.functional.image import peak_signal_noise_ratio

    x, y = rand_images(4, h=32, w=40, noise=0.15)
    ref = peak_signal_noise_ratio((x + 1) / 2, (y + 1) / 2, data_range=1.0, reduction="none", dim=(1, 2, 3))
    assert torch.allclose(psnr(x, y), ref, rtol=0, atol=1e-4)  # dB; measured 2e-6
    assert abs(float(ref[0] - ref[1])) > 1e-3  # the two images differ: a real per-image check


# ---------------------------------------------------------------------- LPIPS
@pytest.fixture(scope="module")
def masked_lpips(one_thread):
    torch.manual_seed(0)
    return MaskedLPIPS(net="alex", pretrained=False)


def test_masked_lpips_identical_is_zero(masked_lpips):
    x, _ = rand_images(6)
    assert torch.allclose(masked_lpips(x, x), torch.zeros(2), atol=1e-7)
    band = boundary_band(square_mask(), width=4)
    assert torch.allclose(masked_lpips(x, x, band), torch.zeros(2), atol=1e-7)


@pytest.mark.filterwarnings("ignore::UserWarning")  # torchvision's notice about lpips' `pretrained=`
def test_masked_lpips_full_image_is_standard_lpips(masked_lpips):
    import lpips

    x, y = rand_images(7, noise=0.3)
    ref_model = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).eval()
    ref_model.load_state_dict(masked_lpips.lpips.state_dict())
    with torch.no_grad():
        ref = ref_model(x, y).flatten()
    full = masked_lpips(x, y)
    assert full.shape == (2,) and (full > 0).all()
    assert torch.allclose(full, ref, rtol=1e-5)
    assert masked_lpips.lpips.spatial  # restored after the full-image call


def test_masked_lpips_region_average(masked_lpips):
    x, y = rand_images(8, noise=0.3)
    with torch.no_grad():
        smap = masked_lpips.spatial_map(x, y)
    assert smap.shape == (2, 1, 32, 32)
    left = torch.zeros(2, 1, 32, 32)
    left[..., :16] = 1
    vl, vr = masked_lpips(x, y, left), masked_lpips(x, y, 1 - left)
    assert torch.allclose(vl, smap[..., :16].mean(dim=(1, 2, 3)), rtol=1e-5)
    assert torch.allclose(vr, smap[..., 16:].mean(dim=(1, 2, 3)), rtol=1e-5)
    assert not torch.allclose(vl, vr, rtol=1e-3)
    assert torch.allclose((vl + vr) / 2, masked_lpips(x, y, torch.ones(2, 1, 32, 32)), rtol=1e-5)
    assert torch.isnan(masked_lpips(x, y, torch.zeros(2, 1, 32, 32))).all()


def test_masked_lpips_frozen_eval(masked_lpips):
    masked_lpips.train()
    assert not any(m.training for m in masked_lpips.lpips.modules())
    assert all(not p.requires_grad for p in masked_lpips.parameters())


def test_masked_lpips_pretrained_missing_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    with pytest.raises(FileNotFoundError, match="alexnet-owt-7be5be79.pth"):
        MaskedLPIPS(net="alex", pretrained=True)
