"""Evaluation metrics for inpainting reconstructions: per image, region-aware.

Conventions: images are float tensors in [-1, 1], shape (B, 3, H, W); masks are (B, 1, H, W) (or
(B, H, W)) with **1 = hole (generated), 0 = known pixel**; soft masks are binarised at 0.5
(`known_region`, `hole_region`). Every metric maps images to [0, 1] (``(x + 1) / 2``, clamped)
and returns one value per image, shape (B,), in fp32, so callers can average them or write a
per-image CSV. A region (``region_mask``, 1 = pixel counts) that is empty gives NaN for that
image: average with `torch.nanmean`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics.functional.image import structural_similarity_index_measure

# PSNR of identical images: MSE is floored at 1e-10, i.e. PSNR is capped at 100 dB (finite, so
# means over a test set stay meaningful).
PSNR_MAX_DB = 100.0
_MSE_FLOOR = 10.0 ** (-PSNR_MAX_DB / 10.0)


# ---------------------------------------------------------------------- helpers
def to01(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped, fp32."""
    return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def _acc(t: torch.Tensor) -> torch.Tensor:
    """Accumulate in float64 (MPS has none: float32 there)."""
    return t.float() if t.device.type == "mps" else t.double()


def _mask4d(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (B, 1, H, W) fp32 mask on `like`'s device; accepts (B, H, W) too."""
    if mask.ndim == 3:
        mask = mask.unsqueeze(1)
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must be (B, 1, H, W) or (B, H, W); got {tuple(mask.shape)}")
    if mask.shape[0] not in (1, like.shape[0]) or mask.shape[-2:] != like.shape[-2:]:
        raise ValueError(f"mask {tuple(mask.shape)} does not match images {tuple(like.shape)}")
    return mask.to(device=like.device, dtype=torch.float32).expand(like.shape[0], 1, *like.shape[-2:])


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"expected two (B, C, H, W) images of the same shape; got {tuple(x.shape)}, {tuple(y.shape)}")


def known_region(mask: torch.Tensor) -> torch.Tensor:
    """1 where the pixel is known (``mask < 0.5``), else 0, as float."""
    return (mask < 0.5).float()


def hole_region(mask: torch.Tensor) -> torch.Tensor:
    """1 where the pixel is in the hole (``mask >= 0.5``), else 0, as float."""
    return (mask >= 0.5).float()


def boundary_band(mask: torch.Tensor, width: int = 8) -> torch.Tensor:
    """Pixels within `width` px (Chebyshev distance) of the hole boundary, on both sides.

    ``dilate(hole) - erode(hole)`` with a ``(2·width+1)`` square structuring element (max-pool).
    The image edge is not a boundary (pixels outside the image are ignored, not treated as known or
    hole), so an all-hole or all-known mask gives an empty band. For a s×s square hole away from
    the image edges and s > 2·width the band has ``(s + 2w)² - (s - 2w)² = 8·s·w`` pixels.
    Returns a float mask shaped like `mask` (1 = in the band).
    """
    if width < 0:
        raise ValueError(f"width must be >= 0; got {width}")
    squeeze = mask.ndim == 3
    hole = hole_region(mask.unsqueeze(1) if squeeze else mask)
    if width == 0:
        band = torch.zeros_like(hole)
    else:
        k = 2 * width + 1
        dilated = F.max_pool2d(hole, k, stride=1, padding=width)
        eroded = 1.0 - F.max_pool2d(1.0 - hole, k, stride=1, padding=width)
        band = dilated - eroded
    return band.squeeze(1) if squeeze else band


# ---------------------------------------------------------------------- pixel metrics
def _masked_mse(x: torch.Tensor, y: torch.Tensor, region_mask: torch.Tensor | None) -> torch.Tensor:
    """Per-image MSE on [0, 1] over the region's pixels and all channels; NaN for an empty region."""
    _check_pair(x, y)
    se = _acc((to01(x) - to01(y)).pow(2))
    if region_mask is None:
        return se.mean(dim=(1, 2, 3))
    w = _acc(_mask4d(region_mask, x))
    num = (se * w).sum(dim=(1, 2, 3))
    den = w.sum(dim=(1, 2, 3)) * x.shape[1]
    return torch.where(den > 0, num / den.clamp_min(1e-12), torch.full_like(num, math.nan))


def psnr(x: torch.Tensor, y: torch.Tensor, region_mask: torch.Tensor | None = None) -> torch.Tensor:
    """PSNR in dB on the [0, 1] scale, per image, over the pixels where ``region_mask == 1``.

    ``MSE = sum(w·(x01 - y01)²) / (3·sum(w))`` (w = region_mask, all ones when None; pass
    `known_region` / `hole_region` / `boundary_band` of the hole mask), ``PSNR = 10·log10(1/MSE)``.
    MSE is floored at 1e-10, so identical images give `PSNR_MAX_DB` = 100 dB instead of inf; an
    empty region gives NaN. Returns (B,) fp32.
    """
    mse = _masked_mse(x, y, region_mask)
    return (10.0 * torch.log10(1.0 / mse.clamp_min(_MSE_FLOOR))).float()


def unmasked_error(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The paper's "unmasked error": squared error on the known pixels (``mask < 0.5``), [0, 1] scale.

    ``reduction="mean"`` (default): ``sum_known (x01 - y01)² / (3 · #known pixels)``, i.e. the MSE
    over known pixels and channels (the paper reports it in units of 1e-5; multiply by 1e5).
    ``reduction="sum"``: the plain sum over known pixels and channels, which is what the authors'
    ``eval.py`` computes per image (``np.sum(((1 - m) * (pred - img))**2)``) before averaging
    over images; it depends on the image size. An image with no known pixel gives NaN (mean) or 0
    (sum). Returns (B,) fp32.
    """
    if reduction == "mean":
        return _masked_mse(x, y, known_region(mask)).float()
    if reduction == "sum":
        _check_pair(x, y)
        se = _acc((to01(x) - to01(y)).pow(2))
        return (se * _acc(_mask4d(known_region(mask), x))).sum(dim=(1, 2, 3)).float()
    raise ValueError(f"reduction must be 'mean' or 'sum'; got {reduction!r}")


# ---------------------------------------------------------------------- SSIM
SSIM_WIN = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _ssim_map(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """`ssim_map` in the accumulation dtype (float64 except on MPS)."""
    _check_pair(x, y)
    h, w = x.shape[-2:]
    if h < SSIM_WIN or w < SSIM_WIN:
        raise ValueError(f"SSIM needs images of at least {SSIM_WIN}x{SSIM_WIN}; got {h}x{w}")
    # torchmetrics sizes the Gaussian window from sigma (int(3.5·σ + 0.5)·2 + 1 = 11 for σ = 1.5), pads
    # the images by reflection and returns the map for every pixel. Its per-image value averages the
    # padded border too, which skimage (and the published SSIM) does not: keep the valid windows only.
    _, full = structural_similarity_index_measure(
        _acc(to01(x)), _acc(to01(y)), gaussian_kernel=True, sigma=SSIM_SIGMA, kernel_size=SSIM_WIN,
        data_range=1.0, k1=SSIM_K1, k2=SSIM_K2, reduction="none", return_full_image=True)
    if full.shape[-2:] != (h, w):  # other torchmetrics versions shaped the map differently
        raise RuntimeError(f"torchmetrics' SSIM map is {tuple(full.shape[-2:])} for {h}x{w} images; "
                           f"this code expects the full-image map of torchmetrics >= 1.9")
    pad = (SSIM_WIN - 1) // 2
    return full[..., pad:-pad, pad:-pad].mean(dim=1, keepdim=True)


def ssim_map(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The SSIM map on [0, 1], mean over channels: (B, 1, H - 10, W - 10) ("valid" windows), fp32.

    torchmetrics' ``structural_similarity_index_measure(return_full_image=True)``, cropped to the
    windows that fit inside the image. Gaussian window 11×11, σ = 1.5, K1 = 0.01, K2 = 0.03, data range 1, population (not sample)
    covariances: the same numbers as ``skimage.metrics.structural_similarity(gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, data_range=1)``, which filters with reflect padding and
    then discards the 5-px border, i.e. keeps exactly the valid windows.
    """
    return _ssim_map(x, y).float()


def ssim(x: torch.Tensor, y: torch.Tensor, region_mask: torch.Tensor | None = None) -> torch.Tensor:
    """SSIM per image (see `ssim_map`), averaged over the map where ``region_mask == 1``.

    The map only exists for windows that fit inside the image ("valid", as skimage's result), so
    `region_mask` is cropped by 5 px on each side to align with it: pixels within 5 px of the
    image edge never count. Region weights are used as given (pass binary masks such as
    `known_region` / `hole_region`); an empty (cropped) region gives NaN. With
    ``region_mask=None`` this equals skimage's ``structural_similarity`` for the full image.
    Returns (B,) fp32.
    """
    s = _ssim_map(x, y)
    if region_mask is None:
        return s.mean(dim=(1, 2, 3)).float()
    pad = (SSIM_WIN - 1) // 2
    w = _acc(_mask4d(region_mask, x)[..., pad:-pad, pad:-pad])
    num = (s * w).sum(dim=(1, 2, 3))
    den = w.sum(dim=(1, 2, 3))
    return torch.where(den > 0, num / den.clamp_min(1e-12), torch.full_like(num, math.nan)).float()


# ---------------------------------------------------------------------- LPIPS
class MaskedLPIPS(nn.Module):
    """LPIPS per image, over the whole image or averaged over a region of its spatial map.

    Wraps ``lpips.LPIPS(spatial=True)`` (frozen, always in eval mode). ``forward(x, y)`` returns
    the standard (non-spatial) LPIPS, i.e. the number papers report; ``forward(x, y, region)``
    averages the spatial LPIPS map (each layer's distance map bilinearly upsampled to H×W and
    summed) over the pixels where ``region == 1`` (e.g. `boundary_band(mask)`); NaN for an empty
    region. Note the features have large receptive fields, so a region's value still depends on
    pixels around it. Images in [-1, 1] (clamped), computed in fp32 without autocast.

    Args:
        net: "vgg" or "alex" trunk.
        pretrained: False uses a random trunk (``pnet_rand=True``; tests / offline only). True
            first checks the torchvision trunk file with `ldm_asym.losses.check_lpips_weights`.
    """

    def __init__(self, net: str = "vgg", pretrained: bool = True):
        super().__init__()
        from ldm_asym.losses import build_lpips

        self.net_name = net
        self.lpips = build_lpips(net, pretrained=pretrained, spatial=True)

    def train(self, mode: bool = True) -> "MaskedLPIPS":
        super().train(mode)
        self.lpips.eval()
        return self

    def spatial_map(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The spatial LPIPS map, (B, 1, H, W), fp32."""
        _check_pair(x, y)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.lpips(x.float().clamp(-1, 1), y.float().clamp(-1, 1)).float()

    @torch.no_grad()
    def forward(self, x: torch.Tensor, y: torch.Tensor, region_mask: torch.Tensor | None = None) -> torch.Tensor:
        if region_mask is None:
            _check_pair(x, y)
            # lpips reads `self.spatial` at call time: turn it off for the standard value.
            self.lpips.spatial = False
            try:
                with torch.autocast(device_type=x.device.type, enabled=False):
                    d = self.lpips(x.float().clamp(-1, 1), y.float().clamp(-1, 1))
            finally:
                self.lpips.spatial = True
            return d.float().flatten()
        d = _acc(self.spatial_map(x, y))
        w = _acc(_mask4d(region_mask, x))
        num = (d * w).sum(dim=(1, 2, 3))
        den = w.sum(dim=(1, 2, 3))
        return torch.where(den > 0, num / den.clamp_min(1e-12), torch.full_like(num, math.nan)).float()


__all__ = [
    "PSNR_MAX_DB",
    "MaskedLPIPS",
    "boundary_band",
    "hole_region",
    "known_region",
    "psnr",
    "ssim",
    "ssim_map",
    "to01",
    "unmasked_error",
]
