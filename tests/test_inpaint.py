"""scripts/inpaint.py (scripts/edit.py --task inpaint) end to end, on a tiny random SD inpainting pipeline
built and saved here (offline). tests/test_edit.py covers the other pipelines."""

import importlib.util
import logging
from pathlib import Path

import numpy as np
import pytest
import tiny_pipelines as tiny
import torch
from conftest import TINY_VAE, make_asym, make_vae
from PIL import Image

from ldm_asym import editing
from ldm_asym.interop import from_diffusers, load_autoencoder
from ldm_asym.models.autoencoder import AsymmetricAutoencoder

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT.parent / "shared" / "data" / "inpainting_examples"


def load_script():
    spec = importlib.util.spec_from_file_location("inpaint_script", ROOT / "scripts" / "inpaint.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{"pipeline": folder, "ckpt": our decoder's diffusers folder (same frozen encoder as the pipeline's VAE)}."""
    tmp = tmp_path_factory.mktemp("inpaint")
    pipe = tiny.sd(tmp)
    vae = pipe.vae
    pipe.save_pretrained(tmp / "pipe")
    asym = make_asym("tiny", seed=1)
    frozen = {k: v for k, v in vae.state_dict().items() if k.startswith(("encoder.", "quant_conv."))}
    asym.load_state_dict(frozen, strict=False)  # a real checkpoint shares the pipeline's frozen encoder
    asym.save_pretrained(tmp / "asym")
    return {"pipeline": tmp / "pipe", "ckpt": tmp / "asym"}


@pytest.fixture
def spy(monkeypatch):
    """Records (z, kwargs, output) of every decode of ours and of diffusers' AutoencoderKL."""
    from diffusers import AutoencoderKL

    calls = {"asym": [], "vanilla": []}
    for name, cls in (("asym", AsymmetricAutoencoder), ("vanilla", AutoencoderKL)):
        def decode(self, z, *args, _orig=cls.decode, _name=name, **kwargs):
            out = _orig(self, z, *args, **kwargs)
            calls[_name].append((z.clone(), kwargs, getattr(out, "sample", out).clone()))
            return out
        monkeypatch.setattr(cls, "decode", decode)
    return calls


def run(models, tmp_path, image, mask, *extra):
    args = ["--pipeline", str(models["pipeline"]), "--ckpt", str(models["ckpt"]), "--image", str(image),
            "--mask", str(mask), "--prompt", "a red cat", "--steps", "2", "--out", str(tmp_path / "out"), *extra]
    assert load_script().main(args) == 0
    return tmp_path / "out"


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.float32)


def test_odd_size_rgba_mask_two_images(models, tmp_path, spy):
    rng = np.random.default_rng(0)
    h, w = 70, 90  # not multiples of 8: padded to 72 x 96, cropped back
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "img.png")
    rgba = np.zeros((h, w, 4), np.uint8)  # white strokes on a transparent layer: transparent = known
    rgba[10:40, 20:60] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "mask.png")
    out = run(models, tmp_path, tmp_path / "img.png", tmp_path / "mask.png", "--num-images", "2", "--seed", "3")

    names = sorted(p.name for p in out.iterdir())
    assert names == ["img_asym_0.png", "img_asym_1.png", "img_compare.png", "img_vanilla_0.png", "img_vanilla_1.png"]
    for name in names[:2] + names[3:]:
        assert Image.open(out / name).size == (w, h)
    assert Image.open(out / "img_compare.png").size == (4 * w, 2 * h)

    # One diffusion run, one decode each: both decoders got the very same latents ...
    (z, kw, _), = spy["asym"]
    (z_vanilla, kw_vanilla, _), = spy["vanilla"]
    assert z.shape == (2, 4, 9, 12) and torch.equal(z, z_vanilla) and not kw_vanilla
    # ... and ours the image and the mask, by keyword, repeated to the latents' batch (which diffusers'
    # pipeline itself forgets: KeyError), 1 = hole, binary, covering exactly the painted strokes.
    image, mask = kw["image"], kw["mask"]
    assert image.shape == (2, 3, 72, 96) and mask.shape == (2, 1, 72, 96)
    assert torch.equal(image[0], image[1]) and torch.equal(mask[0], mask[1])
    expected = torch.from_numpy(pixels(tmp_path / "img.png")).permute(2, 0, 1) / 127.5 - 1
    torch.testing.assert_close(image[0, :, :h, :w], expected, atol=1e-6, rtol=0)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(mask[0, 0, :h, :w], torch.from_numpy(rgba[..., 3] >= 128).float())

    # Different noise per sample; the decoders really differ.
    assert not np.array_equal(pixels(out / "img_vanilla_0.png"), pixels(out / "img_vanilla_1.png"))
    assert not np.array_equal(pixels(out / "img_asym_0.png"), pixels(out / "img_vanilla_0.png"))


def test_mask_reaches_the_blend(models, tmp_path, spy):
    """What random weights can honestly show about the known pixels.

    A random decoder cannot copy known pixels (that is learnt), so "asym is closer to the input on
    known pixels" is not guaranteed here. Exact properties of the additive blend
    `h = h * m + f(image) * (1 - m)` are: with an all-zero mask (everything known) every level's
    state is replaced by branch features of the image, so the output depends on the image alone:
    two samples with different latents decode to the same picture. With an all-ones mask (no
    prior) the blend is the identity, so the output equals a plain decode of the same latents.
    """
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "i.png")
    Image.new("L", (64, 64), 0).save(tmp_path / "zero.png")
    out = run(models, tmp_path, tmp_path / "i.png", tmp_path / "zero.png", "--num-images", "2", "--name", "z")
    assert np.array_equal(pixels(out / "z_asym_0.png"), pixels(out / "z_asym_1.png"))
    assert not np.array_equal(pixels(out / "z_vanilla_0.png"), pixels(out / "z_vanilla_1.png"))

    Image.new("L", (64, 64), 255).save(tmp_path / "ones.png")
    run(models, tmp_path, tmp_path / "i.png", tmp_path / "ones.png", "--name", "o")
    z, kw, decoded = spy["asym"][-1]
    assert kw["mask"].min() == 1
    with torch.no_grad():
        plain = load_autoencoder(models["ckpt"]).decode(z)
    torch.testing.assert_close(decoded, plain, atol=1e-6, rtol=0)


@pytest.mark.skipif(not EXAMPLES.is_dir(), reason="../shared/data/inpainting_examples is absent")
def test_real_photo_soft_rgb_mask_resize(models, tmp_path, spy):
    from safetensors.torch import save_file
    from diffusers import AsymmetricAutoencoderKL

    stem = "overture-creations-5sI6fQgYIuo"
    w, h = 75, 61  # a small working copy in tmp (the tiny pipeline is fast only at small sizes)
    Image.open(EXAMPLES / f"{stem}.png").resize((w, h), Image.BILINEAR).save(tmp_path / "photo.png")
    mask = Image.open(EXAMPLES / f"{stem}_mask.png")
    assert mask.mode == "RGB"
    mask.resize((w, h), Image.BILINEAR).save(tmp_path / "photo_mask.png")
    soft = pixels(tmp_path / "photo_mask.png").mean(-1) / 255
    assert ((soft > 0.05) & (soft < 0.95)).any()  # the edges really are soft
    # Our checkpoint as a bare single file this time (load_autoencoder -> to_diffusers on the fly).
    save_file(AsymmetricAutoencoderKL.from_pretrained(models["ckpt"]).state_dict(), tmp_path / "asym.safetensors")
    models = {**models, "ckpt": tmp_path / "asym.safetensors"}
    out = run(models, tmp_path, tmp_path / "photo.png", tmp_path / "photo_mask.png", "--fit", "resize")

    for kind in ("asym", "vanilla"):
        assert Image.open(out / f"photo_{kind}_0.png").size == (w, h)
    (_, kw, _), = spy["asym"]
    hole = Image.fromarray(soft >= 0.5).resize((72, 64), Image.NEAREST)  # round(75/8)*8, round(61/8)*8
    assert torch.equal(kw["mask"][0, 0], torch.from_numpy(np.array(hole)).float())


def test_encoder_check(caplog):
    vae, asym = make_vae(TINY_VAE), from_diffusers(make_asym("tiny", seed=1))
    with caplog.at_level(logging.WARNING, "ldm_asym.editing"):
        assert not editing.check_encoder(vae, asym)
    assert "encoder differs" in caplog.text
    asym.load_state_dict({k: v for k, v in vae.state_dict().items() if k.startswith(("encoder.", "quant_conv."))},
                         strict=False)
    caplog.clear()
    with caplog.at_level(logging.WARNING, "ldm_asym.editing"):
        assert editing.check_encoder(vae, asym)
    assert not caplog.text
    asym.shift_factor = 0.1159  # a FLUX-style shift the pipeline's VAE does not have
    with caplog.at_level(logging.WARNING, "ldm_asym.editing"):
        assert editing.check_encoder(vae, asym)
    assert "shift_factor differs" in caplog.text
    asym.latent_channels = 16
    with pytest.raises(ValueError, match="latent channels"):
        editing.check_encoder(vae, asym)


def test_clear_errors(models, tmp_path, capsys):
    script = load_script()
    with pytest.raises(SystemExit) as e:
        script.main(["--help"])
    assert e.value.code == 0 and "--num-images" in capsys.readouterr().out
    make_vae(TINY_VAE).save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="plain decoder"):
        editing.load_asym(tmp_path / "plain")
    # Offline, a Hub id must say what to download and where to put it (the inputs are read first).
    Image.new("RGB", (16, 16)).save(tmp_path / "x.png")
    Image.new("L", (16, 16)).save(tmp_path / "m.png")
    args = ["--pipeline", "someone/sd-inpainting", "--ckpt", str(models["ckpt"]), "--image", str(tmp_path / "x.png"),
            "--mask", str(tmp_path / "m.png"), "--out", str(tmp_path)]
    assert script.main(args) == 1
    err = capsys.readouterr().err
    assert "hf download someone/sd-inpainting" in err and "--pipeline DIR" in err
