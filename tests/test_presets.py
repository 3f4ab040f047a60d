"""SDXL and FLUX presets: with random weights in each family's exact VAE config the preset validates
("config OK"), its frozen encoder equals diffusers' and its latent scaling is the family's; a
tiny-width variant trains from shards, exports, and drops into that family's editing pipeline."""

import numpy as np
import pytest
import torch
from conftest import make_vae
from omegaconf import OmegaConf
from PIL import Image
from tiny_pipelines import flux, prompt_embeds, sdxl

from ldm_asym.cli import load_config, main, validate
from ldm_asym.data.shard_writer import Settings, write_shards

FAMILY = {"asym_sdxl": ("sdxl", 0.13025, None, 4), "asym_flux": ("flux", 0.3611, 0.1159, 16)}
AE = "model.params.autoencoder"
SMALL = ["model.params.loss.params.lpips_pretrained=false",  # VGG16 cannot be downloaded here
         "lightning.trainer.enable_progress_bar=false"]


def _shards(tmp_path):
    rng = np.random.default_rng(0)
    files = []
    for i in range(6):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(files[-1])
    for name in ("train", "val"):
        write_shards([str(f) for f in files], [f.name for f in files], str(tmp_path / name), "test", Settings())
    return [f"paths.shards={tmp_path / 'train'}", f"paths.shards_val={tmp_path / 'val'}"]


def _full_vae_config(name):
    cfg = OmegaConf.to_container(load_config(f"configs/{name}.yaml").model.params.autoencoder.vae_config)
    return dict(cfg, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)


@pytest.mark.parametrize("name", FAMILY)
def test_preset_validates_with_its_familys_vae(tmp_path, capsys, name):
    from ldm_asym.interop import init_from_vae
    from ldm_asym.models.autoencoder import AsymmetricAutoencoder

    validate(load_config(f"configs/{name}.yaml"))
    vae = make_vae(_full_vae_config(name))  # the family's real architecture, random weights
    vae.save_pretrained(tmp_path / "vae")
    assert main(["--base", f"configs/{name}.yaml", "-l", str(tmp_path / "logs"), f"paths.sd_vae={tmp_path / 'vae'}",
                 *_shards(tmp_path), *SMALL]) == 0
    assert "config OK" in capsys.readouterr().out

    _, scale, shift, channels = FAMILY[name]
    cfg = load_config(f"configs/{name}.yaml").model.params.autoencoder
    model = AsymmetricAutoencoder(**OmegaConf.to_container(cfg))
    assert init_from_vae(model, tmp_path / "vae")  # the SD-shaped decoder starts from the family's
    assert (model.scaling_factor, model.shift_factor, model.latent_channels) == (scale, shift, channels)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(model.encode(x).mean, vae.encode(x).latent_dist.mean, atol=1e-5)
        z = vae.encode(x).latent_dist.mean
        assert torch.allclose(model.decode(z), vae.decode(z).sample, atol=1e-4)  # its decoder, branch off


@pytest.mark.parametrize("name", FAMILY)
def test_tiny_preset_trains_exports_and_edits(tmp_path, name):
    from ldm_asym.editing import edit, load_asym, prepare
    from ldm_asym.editing.pipelines import size_multiple

    family = FAMILY[name][0]
    pipe = sdxl() if family == "sdxl" else flux()
    pipe.vae.save_pretrained(tmp_path / "vae")  # the pipeline's own (tiny) VAE is the frozen encoder
    tiny = [f"{AE}.vae_config.block_out_channels=[32,32,64,64]", f"{AE}.vae_config.layers_per_block=1",
            f"{AE}.vae_config.norm_num_groups=8", f"{AE}.decoder.params.up_widths=[64,64,64,32]",
            f"{AE}.decoder.params.resnets_per_level=2", "data.params.batch_size=2", "data.params.num_workers=0",
            "data.params.train.params.size=64", "data.params.validation.params.size=64",
            "lightning.trainer.max_steps=3", "lightning.trainer.limit_val_batches=1",
            "lightning.trainer.val_check_interval=3", "lightning.callbacks.checkpoint.every_n_steps=3",
            "lightning.callbacks.images.every_n_steps=3", "model.params.loss.params.disc_start=2",
            "model.params.warmup_steps=1", "lightning.logger.target=pytorch_lightning.loggers.CSVLogger"]
    assert main(["--base", f"configs/{name}.yaml", "-t", "-l", str(tmp_path / "logs"),
                 f"paths.sd_vae={tmp_path / 'vae'}", *_shards(tmp_path), *SMALL, *tiny]) == 0
    run = next(p for p in (tmp_path / "logs").iterdir() if p.is_dir() and not p.name.startswith("."))
    from scripts.export_diffusers import main as export

    assert export(["--ckpt", str(run), "--out", str(tmp_path / "export")]) == 0
    from diffusers import AsymmetricAutoencoderKL

    assert AsymmetricAutoencoderKL.from_pretrained(tmp_path / "export").config.latent_channels == FAMILY[name][3]

    image = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(image)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    asym = load_asym(tmp_path / "export", vae=tmp_path / "vae")
    calls = []
    real = asym.decode
    asym.decode = lambda z, *a, **k: calls.append(k) or real(z, *a, **k)
    prep = prepare(image, tmp_path / "mask.png", multiple=size_multiple(pipe))
    out = edit(pipe, asym, prep, steps=2, seed=0, **prompt_embeds(family))
    assert sorted(out) == ["asym", "vanilla"] and out["asym"][0].size == (64, 64)
    assert calls and calls[0].get("image") is not None and calls[0].get("mask") is not None
