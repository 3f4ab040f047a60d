"""Loading from every real layout, export, and clear errors for bad checkpoints."""

import pickle

import pytest
import torch
from conftest import ASYM_CONFIGS, TINY_VAE, make_asym, make_vae, masks, to_ldm_layout
from safetensors.torch import save_file

from ldm_asym import AsymmetricAutoencoder, AsymmetricDecoder, load_autoencoder
from ldm_asym.interop import WeightsMismatchError, infer_decoder_config, ldm_to_diffusers

TOL = 1e-4


def _same_vae(ref, ours, h=64, w=64):
    x = torch.rand(1, 3, h, w) * 2 - 1
    with torch.no_grad():
        assert (ref.encode(x).latent_dist.mean - ours.encode(x).mean).abs().max() <= TOL
        z = torch.randn(1, 4, h // 8, w // 8)
        assert (ref.decode(z).sample - ours.eval().decode(z)).abs().max() <= TOL


@pytest.fixture(scope="module")
def tiny_vae():
    return make_vae(TINY_VAE)


@pytest.mark.parametrize("layout", ["first_stage_model.ckpt", "vae.safetensors", "bare.safetensors", "bare_diffusers.ckpt"])
def test_sd_single_file_layouts(tmp_path, tiny_vae, layout):
    ldm = to_ldm_layout(tiny_vae.state_dict())
    unet = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(3)}
    if layout.startswith("first_stage_model"):
        obj = {"state_dict": {**{"first_stage_model." + k: v for k, v in ldm.items()}, **unet}, "global_step": 1}
        torch.save(obj, tmp_path / layout)
    elif layout.startswith("vae."):
        save_file({**{"vae." + k: v.contiguous() for k, v in ldm.items()}, **unet}, tmp_path / layout)
    elif layout == "bare.safetensors":
        save_file({k: v.contiguous() for k, v in ldm.items()}, tmp_path / layout)
    else:  # a bare VAE already in diffusers keys
        torch.save(tiny_vae.state_dict(), tmp_path / layout)
    ours = load_autoencoder(tmp_path / layout, norm_num_groups=8)
    assert ours.blend == "none"
    _same_vae(tiny_vae, ours)


def test_authors_lightning_checkpoint(tmp_path):
    """Authors' layout: LDM keys, branch under decoder.encoder.layers, dead up_layers, loss.* tensors."""
    ref = make_asym("tiny")
    sd = to_ldm_layout(ref.state_dict())
    sd["decoder.up_layers.0.weight"] = torch.zeros(64, 64, 4, 4)  # dead transposed convs: dropped
    sd["loss.discriminator.main.0.weight"] = torch.zeros(64, 3, 4, 4)
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "base.ckpt")
    ours = load_autoencoder(tmp_path / "base.ckpt", norm_num_groups=8).eval()
    assert ours.blend == "add" and ours.decoder.up_widths == [64, 64, 64, 32]
    x, m, z = torch.rand(2, 3, 64, 64) * 2 - 1, masks(2, 64, 64)["rect"], torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert (ref.decode(z, image=x, mask=m).sample - ours.decode(z, image=x, mask=m)).abs().max() <= TOL


@pytest.mark.parametrize("preset", ["base", "large_1.5x", "large_2x"])
def test_architecture_inferred_for_released_decoders(preset):
    """The authors' three decoders: widths, resnets and branch are read from shapes alone (meta tensors)."""
    from omegaconf import OmegaConf

    from ldm_asym.cli import load_config

    cfg = load_config(f"configs/asym_{preset}.yaml").model.params.autoencoder.decoder.params
    params = {k: v for k, v in OmegaConf.to_container(cfg).items() if k != "gradient_checkpointing"}
    with torch.device("meta"):
        dec = AsymmetricDecoder(**params)
    sd = {"decoder." + k: v for k, v in dec.state_dict().items()}
    assert not any("up_blocks" in k for k in to_ldm_layout(sd))
    got = infer_decoder_config(ldm_to_diffusers(to_ldm_layout(sd)))
    assert got["up_widths"] == params["up_widths"] and got["resnets_per_level"] == params["resnets_per_level"]
    assert got["blend"] == "add" and got["latent_channels"] == 4


def test_pipeline_root_and_sdxl_scaling(tmp_path, tiny_vae):
    tiny_vae.save_pretrained(tmp_path / "pipe" / "vae")
    ours = load_autoencoder(tmp_path / "pipe", scaling_factor=0.13025)
    assert ours.scaling_factor == 0.13025
    _same_vae(tiny_vae, ours)


def test_decoder_only_file_with_vae_source(tmp_path, tiny_vae):
    ref = make_asym("tiny")
    dec = {k: v for k, v in ref.state_dict().items() if k.startswith("decoder.")}
    torch.save(dec, tmp_path / "dec.pt")
    with pytest.raises(ValueError, match="vae="):
        load_autoencoder(tmp_path / "dec.pt", norm_num_groups=8)
    tiny_vae.save_pretrained(tmp_path / "vae")
    ours = load_autoencoder(tmp_path / "dec.pt", vae=tmp_path / "vae").eval()
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        # the frozen post_quant_conv comes from the VAE source, the decoder from the file
        assert (ref.decoder(tiny_vae.post_quant_conv(z)) - ours.decode(z)).abs().max() <= TOL
        x = torch.rand(1, 3, 64, 64) * 2 - 1
        assert (tiny_vae.encode(x).latent_dist.mean - ours.encode(x).mean).abs().max() <= TOL


def test_sixteen_channel_vae_without_quant_convs(tmp_path):
    """SD3/FLUX-style VAE as the frozen encoder; export adds exact identity quant convs for diffusers."""
    from diffusers import AsymmetricAutoencoderKL

    cfg = dict(TINY_VAE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
               scaling_factor=0.3611, shift_factor=0.1159)
    vae = make_vae(cfg)
    vae.save_pretrained(tmp_path / "flux")
    vanilla = load_autoencoder(tmp_path / "flux")
    assert vanilla.latent_channels == 16 and vanilla.quant_conv is None and vanilla.shift_factor == 0.1159
    _x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert (vae.encode(_x).latent_dist.mean - vanilla.encode(_x).mean).abs().max() <= TOL
    torch.manual_seed(0)
    model = AsymmetricAutoencoder(vae_config=cfg, decoder=dict(up_widths=[64, 64, 64, 32], resnets_per_level=2,
                                                               norm_num_groups=8)).eval()
    assert model.decoder.conv_in.in_channels == 16
    from ldm_asym.interop import export_diffusers

    export_diffusers(model, tmp_path / "out")
    back = AsymmetricAutoencoderKL.from_pretrained(tmp_path / "out").eval()
    x, m, z = torch.rand(1, 3, 64, 64) * 2 - 1, masks(1, 64, 64)["half"], torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        assert (back.decode(z, image=x, mask=m).sample - model.decode(z, image=x, mask=m)).abs().max() <= TOL


class NotATensor:  # a pickled object: loading it needs code execution
    pass


def test_pickle_needs_explicit_trust(tmp_path, tiny_vae):
    torch.save({"state_dict": tiny_vae.state_dict(), "extra": NotATensor()}, tmp_path / "legacy.ckpt")
    with pytest.raises(ValueError, match="trust_pickle"):
        load_autoencoder(tmp_path / "legacy.ckpt", norm_num_groups=8)
    ours = load_autoencoder(tmp_path / "legacy.ckpt", norm_num_groups=8, trust_pickle=True)
    _same_vae(tiny_vae, ours)


def test_bad_checkpoints(tmp_path, tiny_vae):
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        load_autoencoder(tmp_path / "empty.ckpt")
    torch.save(tiny_vae.state_dict(), tmp_path / "full.ckpt")
    data = (tmp_path / "full.ckpt").read_bytes()
    (tmp_path / "trunc.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_autoencoder(tmp_path / "trunc.ckpt")
    save_file({k: v.contiguous() for k, v in tiny_vae.state_dict().items()}, tmp_path / "full.safetensors")
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_autoencoder(tmp_path / "trunc.safetensors")
    torch.save({"model.diffusion_model.out.weight": torch.zeros(3)}, tmp_path / "unet.ckpt")
    with pytest.raises(ValueError, match="no VAE weights"):
        load_autoencoder(tmp_path / "unet.ckpt")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_autoencoder(tmp_path / "missing.ckpt")


def test_mismatch_lists_missing_unexpected_and_shapes(tmp_path, tiny_vae):
    sd = dict(tiny_vae.state_dict())
    sd.pop("decoder.conv_out.bias")
    sd["decoder.surprise.weight"] = torch.zeros(1)
    sd["decoder.conv_in.bias"] = torch.zeros(7)
    torch.save(sd, tmp_path / "bad.ckpt")
    with pytest.raises(WeightsMismatchError) as e:
        load_autoencoder(tmp_path / "bad.ckpt", norm_num_groups=8)
    msg = str(e.value)
    assert "decoder.conv_out.bias" in msg and "decoder.surprise.weight" in msg and "decoder.conv_in.bias" in msg
    # forcing a branch onto a vanilla checkpoint is a mismatch, not a silent random branch
    torch.save(tiny_vae.state_dict(), tmp_path / "vanilla.ckpt")
    with pytest.raises(WeightsMismatchError, match="condition_encoder"):
        load_autoencoder(tmp_path / "vanilla.ckpt", norm_num_groups=8, blend="add")


def test_hub_id_offline_says_what_to_download(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="hf download cross-attention/asymmetric"):
        load_autoencoder("cross-attention/asymmetric-autoencoder-kl-x-1-5")


def test_export_script(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("export_diffusers", "scripts/export_diffusers.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    from diffusers import AsymmetricAutoencoderKL

    make_asym("tiny").save_pretrained(tmp_path / "src")
    assert script.main(["--ckpt", str(tmp_path / "src"), "--out", str(tmp_path / "out")]) == 0
    assert AsymmetricAutoencoderKL.from_pretrained(tmp_path / "out").config.up_block_out_channels == [32, 64, 64, 64]
    torch.manual_seed(0)
    concat = AsymmetricAutoencoder(vae_config=TINY_VAE, decoder=dict(up_widths=[64, 64, 64, 32], resnets_per_level=2,
                                                                     blend="concat", norm_num_groups=8))
    torch.save(concat.state_dict(), tmp_path / "concat.ckpt")
    assert script.main(["--ckpt", str(tmp_path / "concat.ckpt"), "--out", str(tmp_path / "o2")]) == 1
    assert "concat" in capsys.readouterr().err
