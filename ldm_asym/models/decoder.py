"""The one trainable decoder: SD's KL-f8 decoder plus a conditional branch and mask-guided blending.

SD's blocks come from diffusers (`UNetMidBlock2D`, `UpDecoderBlock2D`), so parameter names match
diffusers' `AsymmetricAutoencoderKL` and the SD decoder one to one; only the branch and the blend
are written here. Variants (SD vanilla, base, large 1.5x / 2x, concat ablation) are config values.

Speed (`fast=True`, the default; docs/benchmarks.md has the numbers): the up levels run diffusers'
modules through a leaner forward with the same parameters and the same function, within float
rounding (<= 1e-4 against diffusers, tests/test_model.py):
* nearest x2 upsampling + 3x3 conv is computed on the low-resolution input with the 16 taps it
  really has per output pixel quartet (`upsample_conv`): 16 instead of 36 multiply-adds per input
  pixel and channel pair, and no 4x-sized upsampled tensor. Under autograd as one stride-2
  transposed conv (cheap backward), otherwise as one 2x2 conv with an output channel group per
  output phase (the faster forward);
* resnets skip the division by `output_scale_factor` (1) and, without autograd, apply SiLU and
  the residual add in place (`_resnet`);
* the blend is one `lerp` instead of four elementwise ops.
`fast=False` runs diffusers' layer forwards verbatim (bit-identical to diffusers).
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D, UpDecoderBlock2D
from diffusers.models.upsampling import Upsample2D
from torch import nn
from torch.utils.checkpoint import checkpoint

BLEND_MODES = ("add", "concat", "none")
_PHASES = ((0, 0), (0, 1), (1, 0), (1, 1))


def upsample_taps() -> torch.Tensor:
    """(4, 9, 4) 0/1 matrix: 3x3 taps -> the 2x2 taps of each output phase of nearest x2 + conv3x3.

    Output row 2i + a of `conv3x3(nearest_x2(x))` reads input rows (i-1, i) with kernel rows
    (w0, w1 + w2) when a = 0 and rows (i, i+1) with (w0 + w1, w2) when a = 1; columns likewise.
    `taps[2a + b, 3u + v, 2p + q]` = 1 where 3x3 tap (u, v) is part of 2x2 tap (p, q) of phase (a, b).
    """
    rows = torch.tensor([[[1.0, 0, 0], [0, 1, 1]], [[1.0, 1, 0], [0, 0, 1]]])  # [a, p, u]
    return torch.einsum("apu,bqv->abuvpq", rows, rows).reshape(4, 9, 4)


def upsample_conv(x: torch.Tensor, conv: nn.Conv2d, taps: torch.Tensor) -> torch.Tensor:
    """`conv(F.interpolate(x, scale_factor=2, mode="nearest"))` for a 3x3, padding-1 conv, as one 2x2 conv.

    The four phases' kernels (sums of the 3x3 taps, formed in fp32) are stacked along the output
    channels; a 2x2 conv with padding 1 on the (H, W) input gives all of them at (H+1, W+1), and
    phase (a, b) is the window starting at (a, b), written to output pixels (2i+a, 2j+b).
    Same function as the two-step form up to float rounding (~1e-6 relative); differentiable.
    """
    b, _, h, w = x.shape
    o, i = conv.out_channels, conv.in_channels
    device_type = x.device.type
    # Sum the taps in full precision, also under autocast (meta tensors know no autocast).
    no_autocast = (torch.autocast(device_type=device_type, enabled=False)
                   if torch.amp.is_autocast_available(device_type) else nullcontext())
    with no_autocast:
        weight = torch.matmul(conv.weight.float().reshape(1, o * i, 9), taps.float())  # (4, o*i, 4)
    weight = weight.to(conv.weight.dtype)  # (phase 2a + b, o * i, tap 2p + q)
    if torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad):
        # Under autograd the same 16 taps run as one stride-2 transposed conv (tap (p, q) of phase
        # (a, b) is its kernel entry (3 - a - 2p, 3 - b - 2q)): its backward is two convolutions,
        # where the phase copies below would zero-fill a (4o, H+1, W+1) gradient once per phase.
        # Forward alone, the 2x2 conv below is as fast or faster (docs/benchmarks.md).
        w4 = weight.reshape(2, 2, o, i, 2, 2).permute(3, 2, 4, 0, 5, 1).reshape(i, o, 4, 4).flip(-2, -1)
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            w4 = w4.contiguous(memory_format=torch.channels_last)
        return F.conv_transpose2d(x, w4, conv.bias, stride=2, padding=1)
    weight = weight.reshape(4 * o, i, 2, 2)
    bias = conv.bias.repeat(4) if conv.bias is not None else None
    y = F.conv2d(x, weight, bias, padding=1)  # (B, 4*o, H+1, W+1)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        # NHWC: each phase is a block of whole channel vectors, copied to every other pixel.
        out = y.new_empty((b, h, 2, w, 2, o))
        y_nhwc = y.permute(0, 2, 3, 1)
        for k, (pa, pb) in enumerate(_PHASES):
            out[:, :, pa, :, pb] = y_nhwc[:, pa:pa + h, pb:pb + w, k * o:(k + 1) * o]
        return out.view(b, 2 * h, 2 * w, o).permute(0, 3, 1, 2)
    out = y.new_empty((b, o, h, 2, w, 2))
    for k, (pa, pb) in enumerate(_PHASES):
        out[:, :, :, pa, :, pb] = y[:, k * o:(k + 1) * o, pa:pa + h, pb:pb + w]
    return out.view(b, o, 2 * h, 2 * w)


def _fusable_upsampler(up: nn.Module) -> bool:
    """A diffusers `Upsample2D` doing exactly nearest x2 + Conv2d(3x3, stride 1, padding 1)."""
    conv = getattr(up, "conv", None)
    return (
        type(up) is Upsample2D and up.use_conv and not up.use_conv_transpose and up.interpolate
        and up.norm is None and up.name == "conv" and type(conv) is nn.Conv2d
        and conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
        and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
    )


def _lean_resnet(r: nn.Module) -> bool:
    """A diffusers `ResnetBlock2D` as SD's decoder builds it (no time embedding, no resampling)."""
    return (
        type(r) is ResnetBlock2D and r.time_emb_proj is None and not r.up and not r.down
        and r.time_embedding_norm == "default" and type(r.nonlinearity) is nn.SiLU
        and type(r.norm1) is nn.GroupNorm and type(r.norm2) is nn.GroupNorm
        and (r.dropout.p == 0 or not r.training)
    )


def _resnet(r: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`ResnetBlock2D.forward(x, None)`; in place where autograd does not need the inputs."""
    inplace = not torch.is_grad_enabled()
    h = F.silu(r.norm1(x), inplace=inplace)
    h = r.conv1(h)
    h = F.silu(r.norm2(h), inplace=inplace)
    h = r.conv2(h)  # dropout: p = 0 or eval mode, the identity
    shortcut = r.conv_shortcut(x) if r.conv_shortcut is not None else x
    h = h.add_(shortcut) if inplace else h + shortcut
    if r.output_scale_factor != 1:
        h = h / r.output_scale_factor
    return h


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
        gradient_checkpointing: recompute the mid-block and each up-level resnet / upsampler in backward,
            keeping only their inputs (saves activation memory for ~one extra decoder forward).
        fast: run the up levels through the fused upsample-conv and lean resnet forward, and blend
            with `lerp` (same parameters and function, see the module docstring); False runs
            diffusers' layer forwards verbatim.
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
        fast: bool = True,
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
        self.fast = fast
        # Constant of `upsample_conv`; a buffer so it follows .to(device), not saved in checkpoints.
        self.register_buffer("upsample_taps", upsample_taps(), persistent=False)

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
            if self.fast:
                # h + (1 - mask) * (feat - h) in one kernel: exactly h where mask = 1 and feat where
                # mask = 0. `h` first, so the result keeps h's memory layout, as the two-op form does
                # (diffusers' mid-block attention returns a channels-last-strided tensor).
                return h.lerp(feat, 1 - mask)
            return h * mask + feat * (1 - mask)
        return self.blend_convs[point](torch.cat([h * mask, feat * (1 - mask)], dim=1))

    def _run(self, fn, h: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(fn, h, use_reentrant=False)
        return fn(h)

    def _up_level(self, block: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """`UpDecoderBlock2D.forward(h)` one layer at a time: the fast paths where a layer is SD-shaped,
        and gradient checkpointing per resnet / upsampler, so backward holds one layer's activations."""
        for resnet in block.resnets:
            fast = self.fast and _lean_resnet(resnet)
            h = self._run(partial(_resnet, resnet) if fast else partial(resnet, temb=None), h)
        for up in block.upsamplers or ():
            fast = self.fast and _fusable_upsampler(up)
            h = self._run(partial(upsample_conv, conv=up.conv, taps=self.upsample_taps) if fast else up, h)
        return h

    def forward(self, z: torch.Tensor, image: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        """Decode post-quant-conv latents `z`; with `image` ([-1, 1]) and `mask` (1 = hole) use the known pixels.

        Inputs are assumed valid here; `AsymmetricAutoencoder.decode` checks them.
        """
        return self.conv_out(self.features(z, image, mask))

    def compile_features(self, **kwargs) -> None:
        """`torch.compile` everything but the output conv (names and checkpoints unchanged).

        Why not the whole decoder: the GAN's adaptive weight differentiates the losses w.r.t.
        `conv_out.weight`; behind one compiled graph that runs the whole decoder's backward twice
        per step, with conv_out eager it runs only that conv's weight gradient.
        """
        self.features = torch.compile(self.features, **kwargs)

    def features(self, z: torch.Tensor, image: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        """The decoder up to the output conv's input (after the final norm and activation)."""
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
            h = self._up_level(block, h)
        if conditioned:
            h = self._blend(h, feats[0].to(h.dtype), mask, 0)
        return self.conv_act(self.conv_norm_out(h))
