"""The one trainable decoder: SD's KL-f8 decoder plus a conditional branch and mask-guided blending.

SD's blocks come from diffusers (`UNetMidBlock2D`, `UpDecoderBlock2D`), so parameter names match
diffusers' `AsymmetricAutoencoderKL` and the SD decoder one to one; only the branch and the blend
are written here. Variants (SD vanilla, base, large 1.5x / 2x, concat ablation) are config values.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D, UpDecoderBlock2D
from torch import nn
from torch.utils.checkpoint import checkpoint

BLEND_MODES = ("add", "concat", "none")


class ConditionBranch(nn.Module):
    """Encodes the masked image into one feature map per blend point.

    Layer k's output is kept *before* its ReLU (DESIGN §3). Widths are given explicitly, one per blend
    point from fine to coarse: [full-res after the last level, finest level input, ..., coarsest input].
    The first two layers keep full resolution (3x3, stride 1), every later one halves it (4x4, stride 2).
    The mask is not an input: it only gates the blend. No normalisation, as in the paper.
    """

    def __init__(self, widths: Sequence[int], in_channels: int = 3):
        super().__init__()
        layers, prev = [], in_channels
        for k, width in enumerate(widths):
            if k < 2:
                layers.append(nn.Conv2d(prev, width, kernel_size=3, stride=1, padding=1))
            else:
                layers.append(nn.Conv2d(prev, width, kernel_size=4, stride=2, padding=1))
            prev = width
        # Named `layers` so state-dict keys equal diffusers' `decoder.condition_encoder.layers.k`.
        self.layers = nn.ModuleList(layers)

    def forward(self, masked_image: torch.Tensor) -> list[torch.Tensor]:
        feats, x = [], masked_image
        for k, layer in enumerate(self.layers):
            x = layer(x)
            feats.append(x)
            if k + 1 < len(self.layers):
                x = F.relu(x)
        return feats


class AsymmetricDecoder(nn.Module):
    """SD-style decoder whose levels see the known pixels of the input (Zhu et al. 2023, §3).

    Args:
        latent_channels: channels of the (post-quant-conv) latent; 4 for SD/SDXL, 16 for SD3/FLUX.
        up_widths: channel width of each up level in the order the decoder runs, **coarse -> fine**
            (SD: 512, 512, 256, 128). This is the reverse of diffusers' `up_block_out_channels`.
        resnets_per_level: resnet blocks in each up level (SD: 3; diffusers' `layers_per_up_block` + 1).
        blend: "add" (the paper's MGB), "concat" (ablation: 1x1 conv over [h*m, f*(1-m)], initialised
            to equal "add") or "none" (the vanilla SD decoder, no branch).
        norm_num_groups: GroupNorm groups everywhere (SD: 32).
        gradient_checkpointing: recompute mid and up blocks in backward to save activation memory.
    """

    def __init__(
        self,
        latent_channels: int = 4,
        out_channels: int = 3,
        up_widths: Sequence[int] = (512, 512, 256, 128),
        resnets_per_level: int = 3,
        blend: Literal["add", "concat", "none"] = "add",
        norm_num_groups: int = 32,
        act_fn: str = "silu",
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        if blend not in BLEND_MODES:
            raise ValueError(f"blend must be one of {', '.join(BLEND_MODES)}; got {blend!r}")
        up_widths = [int(w) for w in up_widths]
        if len(up_widths) < 2:
            raise ValueError(f"up_widths needs at least 2 levels (coarse -> fine); got {up_widths}")
        bad = [w for w in up_widths if w % norm_num_groups]
        if bad:
            raise ValueError(f"up_widths {up_widths} must be multiples of norm_num_groups={norm_num_groups}")
        self.blend = blend
        self.up_widths = up_widths
        self.gradient_checkpointing = gradient_checkpointing

        self.conv_in = nn.Conv2d(latent_channels, up_widths[0], kernel_size=3, padding=1)
        self.mid_block = UNetMidBlock2D(
            in_channels=up_widths[0],
            resnet_eps=1e-6,
            resnet_act_fn=act_fn,
            output_scale_factor=1,
            resnet_time_scale_shift="default",
            attention_head_dim=up_widths[0],  # single head, as SD
            resnet_groups=norm_num_groups,
            temb_channels=None,
        )
        self.up_blocks = nn.ModuleList()
        in_width = up_widths[0]
        for i, width in enumerate(up_widths):
            self.up_blocks.append(
                UpDecoderBlock2D(
                    in_channels=in_width,
                    out_channels=width,
                    num_layers=resnets_per_level,
                    resnet_eps=1e-6,
                    resnet_act_fn=act_fn,
                    resnet_groups=norm_num_groups,
                    add_upsample=i + 1 < len(up_widths),
                    temb_channels=None,
                )
            )
            in_width = width
        self.conv_norm_out = nn.GroupNorm(num_channels=up_widths[-1], num_groups=norm_num_groups, eps=1e-6)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(up_widths[-1], out_channels, kernel_size=3, padding=1)

        if blend != "none":
            # Blend points, fine -> coarse: after the last level (finest width), then the input of each
            # level from finest to coarsest (= the previous level's width; the mid-block's for level 0).
            level_inputs = [up_widths[0]] + up_widths[:-1]
            self.blend_widths = [up_widths[-1]] + level_inputs[::-1]
            self.condition_encoder = ConditionBranch(self.blend_widths, in_channels=out_channels)
            if blend == "concat":
                self.blend_convs = nn.ModuleList(nn.Conv2d(2 * w, w, kernel_size=1) for w in self.blend_widths)
                self.reset_concat_to_add()

    @torch.no_grad()
    def reset_concat_to_add(self) -> None:
        """Set each concat conv to [I | I], zero bias, so that concat computes exactly `add` at step 0."""
        for conv in self.blend_convs:
            c = conv.out_channels
            eye = torch.eye(c, dtype=conv.weight.dtype, device=conv.weight.device)[:, :, None, None]
            conv.weight.copy_(torch.cat([eye, eye], dim=1))
            conv.bias.zero_()

    @property
    def upsample_factor(self) -> int:
        return 2 ** (len(self.up_widths) - 1)

    def sd_parameter_names(self) -> set[str]:
        """Names of the parameters shaped like the SD decoder's (everything except the branch and blend)."""
        return {n for n, _ in self.named_parameters() if not n.startswith(("condition_encoder.", "blend_convs."))}

    def _blend(self, h: torch.Tensor, feat: torch.Tensor, mask: torch.Tensor, point: int) -> torch.Tensor:
        if mask.shape[-2:] != h.shape[-2:]:
            mask = F.interpolate(mask, size=h.shape[-2:], mode="nearest")
        mask = mask.to(h.dtype)
        if self.blend == "add":
            return h * mask + feat * (1 - mask)
        return self.blend_convs[point](torch.cat([h * mask, feat * (1 - mask)], dim=1))

    def _run(self, block: nn.Module, h: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, h, use_reentrant=False)
        return block(h)

    def forward(self, z: torch.Tensor, image: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        """Decode post-quant-conv latents `z`; with `image` ([-1, 1]) and `mask` (1 = hole) use the known pixels.

        Inputs are assumed valid here; `AsymmetricAutoencoder.decode` checks them.
        """
        h = self._run(self.mid_block, self.conv_in(z))
        conditioned = self.blend != "none" and image is not None and mask is not None
        if conditioned:
            feats = self.condition_encoder((1 - mask) * image)
            mask = mask.to(h.dtype)
        n = len(self.up_blocks)
        for i, block in enumerate(self.up_blocks):
            if conditioned:
                point = n - i  # level i's input is blend point n - i (fine -> coarse numbering)
                h = self._blend(h, feats[point].to(h.dtype), mask, point)
            h = self._run(block, h)
        if conditioned:
            h = self._blend(h, feats[0].to(h.dtype), mask, 0)
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))
