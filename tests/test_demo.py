"""The offline demo: the shipped stage-1 autoencoder works, and scripts/demo.py runs end to end.

The full demo with its bar (>= 50x lower unmasked error, hole PSNR within 0.2 dB, plain decoding no
worse) is `make demo` and `test_full_demo_meets_its_bar`; the other tests run a few steps only.
"""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from ldm_asym import load_autoencoder
from ldm_asym.cli import RUN_DIR_ENV, load_config, validate
from ldm_asym.data import SkimageDataset
from ldm_asym.metrics import psnr

ROOT = Path(__file__).resolve().parents[1]
VAE = ROOT / "data" / "demo_vae"
# Measured on the shipped data/demo_vae (stage-1 run, step-1000 checkpoint): mean PSNR 19.9 dB on the
# 64 held-out 64x64 crops (20.4 dB at 128x128). A broken export, a wrong config.json or an untrained
# VAE falls far below this.
MIN_HELD_OUT_PSNR = 19.5


def load_demo_script():
    spec = importlib.util.spec_from_file_location("demo_script", ROOT / "scripts" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_vae_is_small_kl_f8_and_reconstructs_held_out_crops():
    files = sorted(p.name for p in VAE.iterdir())
    assert files == ["config.json", "diffusion_pytorch_model.safetensors"], files
    assert sum(p.stat().st_size for p in VAE.iterdir()) < 5.5e6
    model = load_autoencoder(VAE).eval()
    assert model.blend == "none" and model.downsample_factor == 8 and model.latent_channels == 4

    val = SkimageDataset(split="val", size=64, n_crops=64, masks={"p_full": 1.0})
    x = torch.stack([val[i]["image"] for i in range(len(val))])
    with torch.no_grad():
        posterior = model.encode(x)
        rec = model.decode(posterior.mode()).clamp(-1, 1)
    value = psnr(x, rec).mean().item()
    assert value > MIN_HELD_OUT_PSNR, f"held-out PSNR {value:.2f} dB"
    # The shipped scaling factor brings the latents to about unit variance, as SD's 0.18215 does.
    std = (posterior.mode() * model.scaling_factor).std().item()
    assert 0.6 < std < 1.6, std


def test_demo_vae_loads_in_diffusers():
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(VAE).eval()
    ours = load_autoencoder(VAE).eval()
    x = SkimageDataset(split="val", size=64, n_crops=2)[1]["image"][None]
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode()
        assert torch.allclose(z, ours.encode(x).mode(), atol=1e-5)
        assert torch.allclose(vae.decode(z).sample, ours.decode(z), atol=1e-5)


def test_demo_configs_validate_and_match_the_shipped_vae():
    for name in ("demo_stage1", "demo"):
        validate(load_config(ROOT / "configs" / f"{name}.yaml"))
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    vae_cfg = json.loads((VAE / "config.json").read_text())
    arch = cfg.model.params.autoencoder
    assert list(arch.vae_config.block_out_channels) == vae_cfg["block_out_channels"]
    assert arch.vae_config.layers_per_block == vae_cfg["layers_per_block"]
    assert arch.vae_config.norm_num_groups == vae_cfg["norm_num_groups"]
    # Same shape as the stage-1 decoder (so init_decoder_from_vae applies), plus the branch.
    assert list(arch.decoder.params.up_widths) == vae_cfg["block_out_channels"][::-1]
    assert arch.decoder.params.blend == "add"


def test_check_bar():
    demo = load_demo_script()

    def results(cut, hole_change, plain_change=0.0):
        return {"presets": {"thick": {"unmasked_error_cut": cut, "hole_psnr_change_db": hole_change}},
                "no_mask_psnr": {"vanilla": 20.0, "ours": 20.0 + plain_change}}

    assert demo.check_bar(results(51.0, -0.15, 0.0), True)[0]
    assert not demo.check_bar(results(49.0, 0.3), True)[0]
    assert not demo.check_bar(results(60.0, -0.25), True)[0]
    assert not demo.check_bar(results(60.0, 0.0, -0.05), True)[0]  # plain decoding must not get worse
    assert not demo.check_bar(results(60.0, 0.0), False)[0]  # the encoder must stay frozen


def test_demo_smoke(tmp_path, monkeypatch, capsys):
    """A few steps through the real CLI, then the whole evaluation: table, grids, results files."""
    monkeypatch.setenv(RUN_DIR_ENV, "")  # main.py records its run folder here; restored afterwards
    demo = load_demo_script()
    rc = demo.main(["--steps", "3", "--val-crops", "8", "--no-bar", "--logdir", str(tmp_path),
                    "--threads", str(torch.get_num_threads())])
    out = capsys.readouterr().out
    assert rc == 0
    for text in ("PSNR known", "PSNR hole", "unmasked err", "vanilla (stage 1)", "ours (asymmetric)",
                 "frozen encoder unchanged by training: yes", "Comparison grids"):
        assert text in out, text
    assert "PASS" in out or "FAIL" in out

    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 3
    assert ckpt["ldm_asym"]["pretrained_names"], "the decoder did not start from the stage-1 decoder"

    results = json.loads((run_dir / "demo" / "results.json").read_text())
    assert results["steps"] == 3 and results["encoder_unchanged"] is True
    assert set(results["presets"]) == {"medium", "thick"}
    for res in results["presets"].values():
        for dec in ("vanilla", "ours"):
            assert all(math.isfinite(v) for v in res[dec].values()), res
        assert 0 < res["hole_fraction"] < 0.6
    assert "PSNR known" in (run_dir / "demo" / "results.md").read_text()
    for preset in ("medium", "thick"):
        with Image.open(run_dir / "demo" / f"{preset}.png") as im:
            assert im.width > 8 * 128 * 2 and im.height > 6 * 128 * 2  # 8 crops x 6 rows of 128² crops, upscaled x2


def test_demo_bar_failure_exits_nonzero(tmp_path, monkeypatch):
    """Without --no-bar a run that misses the bar (1 step cannot pass it) exits with status 1."""
    monkeypatch.setenv(RUN_DIR_ENV, "")
    demo = load_demo_script()
    assert demo.main(["--steps", "1", "--val-crops", "4", "--presets", "thick", "--grid-crops", "4",
                      "--logdir", str(tmp_path)]) == 1


def test_demo_reports_a_missing_vae(tmp_path, capsys):
    demo = load_demo_script()
    assert demo.main(["--vae", str(tmp_path / "nowhere"), "--logdir", str(tmp_path)]) == 2
    assert "docs/demo.md" in capsys.readouterr().err


def test_full_demo_meets_its_bar(tmp_path, monkeypatch, capsys):
    """`make demo` itself (3-5 minutes on 2 cores, depending on their speed): the issue's bar, shipped VAE and config.

    Measured margins at the default seed 23 (docs/convergence.md, 2 cores of an AMD EPYC): 58.0x /
    60.1x lower unmasked error (bar: 50x), hole PSNR +0.32 / +0.68 dB (bar: -0.2 dB), plain decoding
    +0.52 dB (bar: 0 dB). A fixed seed gives the same table on a given machine; a CPU whose kernels
    round differently behaves like another seed, and two seeds of the five measured miss the bar.
    """
    monkeypatch.setenv(RUN_DIR_ENV, "")
    demo = load_demo_script()
    rc = demo.main(["--logdir", str(tmp_path), "--threads", str(torch.get_num_threads())])
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    results = json.loads((run_dir / "demo" / "results.json").read_text())
    assert results["passed"] and results["crop_size"] == 128
    assert results["steps"] == demo.config_steps(demo.DEFAULT_CONFIG) == 700
    for res in results["presets"].values():
        assert res["unmasked_error_cut"] >= demo.MIN_UNMASKED_ERROR_CUT
        assert res["hole_psnr_change_db"] >= -demo.MAX_HOLE_PSNR_DROP_DB
    assert results["no_mask_psnr"]["ours"] >= results["no_mask_psnr"]["vanilla"] - demo.MAX_PLAIN_PSNR_DROP_DB
    assert "Convergence curves:" in out and (run_dir / "demo" / "curves.png").is_file()  # validation every 100 steps
