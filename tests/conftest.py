"""Shared fixtures: diffusers models built from real configs with random weights (no downloads)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

ENC = dict(down_block_types=["DownEncoderBlock2D"] * 4, down_block_out_channels=[128, 256, 512, 512],
           layers_per_down_block=2, latent_channels=4)
# Released configs (DESIGN §6) and a tiny one with the same structure.
ASYM_CONFIGS = {
    "x-1-5": dict(**ENC, up_block_types=["UpDecoderBlock2D"] * 4, up_block_out_channels=[192, 384, 768, 768],
                  layers_per_up_block=3),
    "x-2": dict(**ENC, up_block_types=["UpDecoderBlock2D"] * 4, up_block_out_channels=[256, 512, 1024, 1024],
                layers_per_up_block=5),
    "tiny": dict(down_block_types=["DownEncoderBlock2D"] * 4, down_block_out_channels=[32, 32, 64, 64],
                 layers_per_down_block=1, latent_channels=4, up_block_types=["UpDecoderBlock2D"] * 4,
                 up_block_out_channels=[32, 64, 64, 64], layers_per_up_block=1, norm_num_groups=8),
}
SD15_VAE = dict(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, sample_size=512)
TINY_VAE = dict(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                block_out_channels=[32, 32, 64, 64], layers_per_block=1, latent_channels=4, norm_num_groups=8)


def perturb_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights that make every tensor matter (GroupNorm affine and biases are 1/0 at init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def make_asym(name: str, seed: int = 0):
    from diffusers import AsymmetricAutoencoderKL

    torch.manual_seed(seed)
    return perturb_(AsymmetricAutoencoderKL(**ASYM_CONFIGS[name]).eval(), seed)


def make_vae(config=SD15_VAE, seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return perturb_(AutoencoderKL(**config).eval(), seed)


def masks(b: int, h: int, w: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Named test masks, 1 = hole."""
    g = torch.Generator().manual_seed(seed)
    rect = torch.zeros(b, 1, h, w)
    rect[:, :, h // 4: h // 2 + 5, w // 3: w - 7] = 1
    half = torch.zeros(b, 1, h, w)
    half[..., :, : w // 2] = 1
    soft = torch.nn.functional.avg_pool2d(torch.rand(b, 1, h, w, generator=g), 9, 1, 4)
    soft = ((soft - soft.amin()) / (soft.amax() - soft.amin())).clamp(0, 1)
    return {"rect": rect, "half": half, "soft": soft}


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="module")
def one_thread():
    """For files of tiny models: intra-op threads only add overhead there, and on a busy 2-core
    machine OpenMP spin-waiting makes 2 threads many times slower than 1."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def to_ldm_layout(sd: dict) -> dict:
    """diffusers keys -> original LDM / authors' keys (DESIGN §6), written independently of ldm_asym."""
    import re

    n_up = len({k.split(".")[2] for k in sd if k.startswith("decoder.up_blocks.")})
    out = {}
    for key, v in sd.items():
        k = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
        k = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
        m = re.match(r"^decoder\.up_blocks\.(\d+)\.(.*)$", k)
        if m:
            rest = m.group(2).replace("resnets.", "block.").replace("upsamplers.0.", "upsample.")
            k = f"decoder.up.{n_up - 1 - int(m.group(1))}.{rest}"
        k = k.replace("mid_block.resnets.0.", "mid.block_1.").replace("mid_block.resnets.1.", "mid.block_2.")
        k = k.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        k = k.replace("decoder.condition_encoder.", "decoder.encoder.")
        if ".mid_block.attentions.0." in k:
            k = k.replace("mid_block.attentions.0.", "mid.attn_1.")
            for a, b in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
                k = k.replace(f".{a}.", f".{b}.")
            if v.ndim == 2:
                v = v[:, :, None, None]  # LDM uses 1x1 convs
        out[k] = v
    return out
