"""Frozen SD VAE encoder + the trainable asymmetric decoder."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution, Encoder
from torch import nn

from ldm_asym.models.decoder import AsymmetricDecoder
from ldm_asym.models.tiling import Tiling, as_tiling, tiled_decode
from ldm_asym.util import instantiate_from_config

# diffusers' AutoencoderKL defaults; any AutoencoderKL config.json can be passed as `vae_config`
# (unknown keys such as `_class_name`, `sample_size`, `force_upcast` are ignored).
_VAE_DEFAULTS = dict(
    in_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    scaling_factor=0.18215,
    shift_factor=None,
    use_quant_conv=True,
    use_post_quant_conv=True,
    mid_block_add_attention=True,
)


def _vae_config(cfg: Mapping[str, Any] | None) -> dict:
    out = dict(_VAE_DEFAULTS)
    for key, value in (cfg or {}).items():
        if key in _VAE_DEFAULTS:
            out[key] = value
    # An AsymmetricAutoencoderKL config names the encoder fields differently.
    if cfg and "down_block_out_channels" in cfg:
        out["block_out_channels"] = cfg["down_block_out_channels"]
        out["layers_per_block"] = cfg.get("layers_per_down_block", out["layers_per_block"])
    out["block_out_channels"] = [int(c) for c in out["block_out_channels"]]
    out["down_block_types"] = list(out["down_block_types"])
    return out


class AsymmetricAutoencoder(nn.Module):
    """SD's VAE encoder (frozen) and an `AsymmetricDecoder`.

    Args:
        vae_config: a diffusers `AutoencoderKL` config (dict): SD 1.x/2.x, SDXL, SD3/FLUX (16 channels,
            no quant convs, `shift_factor`) all work. It builds the frozen encoder, `quant_conv` and
            `post_quant_conv`, and holds `scaling_factor` / `shift_factor` for pipelines.
        decoder: `AsymmetricDecoder` kwargs, a `{target, params}` config, or a module.
        freeze_encoder: keep encoder, `quant_conv` and `post_quant_conv` frozen and in eval mode.

    State-dict keys equal diffusers' `AsymmetricAutoencoderKL` (`encoder.*`, `quant_conv.*`,
    `post_quant_conv.*`, `decoder.*`), so its weights load with no renaming.
    """

    def __init__(
        self,
        vae_config: Mapping[str, Any] | None = None,
        decoder: Mapping[str, Any] | nn.Module | None = None,
        freeze_encoder: bool = True,
    ):
        super().__init__()
        cfg = _vae_config(vae_config)
        self.vae_config = cfg
        self.latent_channels = c = int(cfg["latent_channels"])
        self.scaling_factor = cfg["scaling_factor"]
        self.shift_factor = cfg["shift_factor"]
        self.encoder = Encoder(
            in_channels=cfg["in_channels"],
            out_channels=c,
            down_block_types=cfg["down_block_types"],
            block_out_channels=cfg["block_out_channels"],
            layers_per_block=cfg["layers_per_block"],
            act_fn=cfg["act_fn"],
            norm_num_groups=cfg["norm_num_groups"],
            double_z=True,
            mid_block_add_attention=cfg["mid_block_add_attention"],
        )
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1) if cfg["use_quant_conv"] else None
        self.post_quant_conv = nn.Conv2d(c, c, 1) if cfg["use_post_quant_conv"] else None

        # The decoder inherits latent channels and GroupNorm groups from the VAE unless told otherwise.
        inherited = {"latent_channels": c, "norm_num_groups": cfg["norm_num_groups"]}
        if isinstance(decoder, nn.Module):
            self.decoder = decoder
        elif decoder is not None and "target" in decoder:
            self.decoder = instantiate_from_config(decoder, **inherited)
        else:
            self.decoder = AsymmetricDecoder(**{**inherited, **dict(decoder or {})})
        self.downsample_factor = 2 ** (len(cfg["block_out_channels"]) - 1)
        if self.decoder.upsample_factor != self.downsample_factor:
            raise ValueError(
                f"decoder upsamples by {self.decoder.upsample_factor} but the encoder downsamples by "
                f"{self.downsample_factor}: give the decoder {len(cfg['block_out_channels'])} up_widths"
            )
        self.freeze_encoder = freeze_encoder
        if freeze_encoder:
            for module in self.frozen_modules():
                module.requires_grad_(False)
                module.eval()

    @property
    def blend(self) -> str:
        return self.decoder.blend

    def frozen_modules(self) -> list[nn.Module]:
        return [m for m in (self.encoder, self.quant_conv, self.post_quant_conv) if m is not None]

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_encoder:  # BatchNorm-free, but keeps dropout etc. off and states the intent
            for module in self.frozen_modules():
                module.eval()
        return self

    # ------------------------------------------------------------------ encode / decode
    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Image in [-1, 1] (Bx3xHxW) -> posterior with `.mean`, `.mode()`, `.sample(generator)`."""
        _check_image(x, "x", self.downsample_factor)
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussianDistribution(moments)

    def decode(
        self,
        z: torch.Tensor,
        image: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        check_inputs: bool = True,
        tile: int | Tiling | Mapping[str, int] | None = None,
    ) -> torch.Tensor:
        """Unscaled latent `z` (as diffusers' `decode`) -> image in about [-1, 1].

        `image` ([-1, 1], Bx3xHxW, floating point) and `mask` (Bx1xHxW, 1 = hole, soft values
        allowed) turn on the conditional branch; without them (or with `blend: none`) this is a
        plain decoder. Both are cast to `z`'s dtype: a bool mask (True = hole), an integer 0/1 mask
        or a float64 one (`torch.from_numpy`) work as they are. An empty batch is an error.
        `check_inputs=False` skips the value checks (NaN / Inf, mask in [0, 1], image in [-1, 1]
        give or take 0.1: an image in [0, 255] or [0, 1] is not the same thing), which
        synchronise with the GPU once.

        `tile` decodes in overlapping latent tiles with blended seams, for images too large to decode
        at once (`ldm_asym.models.tiling`): an int tile size in latent pixels (overlap size // 4),
        `Tiling(size, overlap, stats)` or {"size": ..., "overlap": ..., "stats": ...}. Memory is bounded
        by the tile under `no_grad` / `inference_mode`. The output is not the untiled decode's: with
        stats="tile" (the default) GroupNorm statistics and attention are per tile, a large gap with
        random weights; stats="image" uses image-wide GroupNorm statistics (attention stays per
        tile), much closer, at several times the time (docs/benchmarks.md, tiled decoding).
        A latent that fits in one tile, and `tile=None`, decode untiled.
        """
        tiling = as_tiling(tile)
        image, mask = _check_decode_inputs(z, image, mask, self.downsample_factor, check_inputs)
        if tiling is not None and not tiling.fits(*z.shape[-2:]):
            norms = [m for m in self.decoder.modules() if isinstance(m, nn.GroupNorm)]
            return tiled_decode(self._decode_checked, z, image, mask, tiling, self.downsample_factor, norms)
        return self._decode_checked(z, image, mask)

    def _decode_checked(self, z: torch.Tensor, image: torch.Tensor | None, mask: torch.Tensor | None):
        # post_quant_conv is 1x1, so applying it per tile equals cropping its full-size output.
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z, image, mask)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, sample_posterior: bool = True,
                generator: torch.Generator | None = None):
        """Reconstruct `x` with its own known pixels; returns (reconstruction, posterior)."""
        posterior = self.encode(x)
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return self.decode(z, image=x if mask is not None else None, mask=mask), posterior

    # ------------------------------------------------------------------ description
    def config(self) -> dict:
        """A plain dict that rebuilds this model: `AsymmetricAutoencoder(**model.config())`."""
        d = self.decoder
        return {
            "vae_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.vae_config.items()},
            "decoder": {
                "latent_channels": self.latent_channels,
                "out_channels": d.conv_out.out_channels,
                "up_widths": list(d.up_widths),
                "resnets_per_level": len(d.up_blocks[0].resnets),
                "blend": d.blend,
                "norm_num_groups": d.conv_norm_out.num_groups,
            },
        }


# ---------------------------------------------------------------------- input checks
IMAGE_RANGE_TOL = 0.1  # resampled or reconstructed images overshoot [-1, 1] a little; [0, 255] ones by far


def _check_image(x: torch.Tensor, name: str, factor: int) -> None:
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"{name} must be Bx3xHxW; got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(x.shape)}): nothing to encode or decode")
    if x.shape[-2] % factor or x.shape[-1] % factor:
        raise ValueError(f"{name} height and width must be multiples of {factor}; got {tuple(x.shape[-2:])}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a float tensor in [-1, 1]; got dtype {x.dtype} "
                         f"(for 0..255 pixels use x.float() / 127.5 - 1)")


def _check_decode_inputs(z, image, mask, factor: int, check_values: bool):
    """Validate decode()'s inputs; returns (image, mask) cast to z's dtype (unchanged if None)."""
    if z.ndim != 4:
        raise ValueError(f"z must be BxCxhxw; got shape {tuple(z.shape)}")
    if z.shape[0] == 0:
        raise ValueError(f"z is an empty batch (shape {tuple(z.shape)}): nothing to decode")
    if (image is None) != (mask is None):
        raise ValueError("image and mask must be given together (mask: 1 = hole), or neither")
    if image is None:
        if check_values and not torch.isfinite(z).all():
            raise ValueError("z contains NaN or Inf")
        return image, mask
    _check_image(image, "image", factor)
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must be Bx1xHxW (one channel, 1 = hole); got shape {tuple(mask.shape)}")
    expected = (z.shape[-2] * factor, z.shape[-1] * factor)
    if tuple(image.shape[-2:]) != expected or tuple(mask.shape[-2:]) != expected:
        raise ValueError(
            f"latent {tuple(z.shape)} decodes to {expected}, but image is {tuple(image.shape[-2:])} "
            f"and mask is {tuple(mask.shape[-2:])}"
        )
    if not (z.shape[0] == image.shape[0] == mask.shape[0]):
        raise ValueError(
            f"batch sizes differ: z {z.shape[0]}, image {image.shape[0]}, mask {mask.shape[0]}"
        )
    if mask.is_complex():
        raise ValueError(f"mask must be real (bool, integer or float, 1 = hole); got dtype {mask.dtype}")
    # bool / integer / float64 masks and float64 images (torch.from_numpy) in the model's dtype;
    # a float64 mask would otherwise promote the blend to float64 and fail in the next conv.
    image, mask = image.to(z.dtype), mask.to(z.dtype)
    if check_values:
        finite = [torch.isfinite(t).all() for t in (z, image, mask)]
        stats = torch.stack([*finite, *mask.aminmax(), *image.aminmax()]).float().tolist()  # one host sync
        for name, ok in zip(("z", "image", "mask"), stats[:3]):
            if not ok:
                raise ValueError(f"{name} contains NaN or Inf")
        m_lo, m_hi, i_lo, i_hi = stats[3:]
        if m_lo < 0 or m_hi > 1:
            raise ValueError(f"mask values must lie in [0, 1] (1 = hole); got min {m_lo:.4g}, max {m_hi:.4g}")
        if i_lo < -1 - IMAGE_RANGE_TOL or i_hi > 1 + IMAGE_RANGE_TOL:
            raise ValueError(f"image values must lie in [-1, 1]; got min {i_lo:.4g}, max {i_hi:.4g} "
                             f"(0..255 pixels: pass x / 127.5 - 1; 0..1 pixels: x * 2 - 1)")
    return image, mask
