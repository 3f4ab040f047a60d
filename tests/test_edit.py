"""scripts/edit.py / ldm_asym.editing on tiny random pipelines of every supported family (offline).

What random weights can show: the plumbing. Each family runs once to latents; we check that both
decoders get the very same latents, that the pipeline VAE's result equals what the pipeline itself
would have produced from the same seed (so unpacking and unscaling are right), and that our decoder
gets the source image and the mask as drawn (1 = hole). A random decoder cannot keep known pixels
(that is learnt), so for the known-pixel check ours is swapped for a stand-in of a perfectly trained
one: it runs as usual, then pastes the known pixels it was given. If image or mask were misaligned,
flipped or inverted, the stand-in's known pixels would be wrong.
"""

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import tiny_pipelines as tiny
import torch
from PIL import Image

from ldm_asym import editing
from ldm_asym.editing import pipelines
from ldm_asym.interop import to_diffusers
from ldm_asym.models.autoencoder import AsymmetricAutoencoder

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def edit_script():
    spec = importlib.util.spec_from_file_location("edit_script", ROOT / "scripts" / "edit.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


@pytest.fixture
def spy(monkeypatch):
    """Records every decode of ours and of diffusers' AutoencoderKL: dicts of z, kwargs and output.
    spy["perfect"] = True turns ours into the perfectly trained stand-in (see the module docstring)."""
    from diffusers import AutoencoderKL

    calls = {"asym": [], "vanilla": [], "perfect": False}
    asym_decode, vae_decode = AsymmetricAutoencoder.decode, AutoencoderKL.decode

    def ours(self, z, *args, **kwargs):
        out = asym_decode(self, z, *args, **kwargs)
        calls["asym"].append({"z": z.clone(), "kw": kwargs, "out": out.clone()})
        if calls["perfect"] and kwargs.get("mask") is not None:
            out = out * kwargs["mask"] + kwargs["image"] * (1 - kwargs["mask"])
        return out

    def theirs(self, z, *args, **kwargs):
        out = vae_decode(self, z, *args, **kwargs)
        calls["vanilla"].append({"z": z.clone(), "kw": kwargs,
                                 "tiles": (self.use_tiling, self.tile_latent_min_size, self.tile_sample_min_size)})
        return out

    monkeypatch.setattr(AsymmetricAutoencoder, "decode", ours)
    monkeypatch.setattr(AutoencoderKL, "decode", theirs)
    return calls


def inputs(folder: Path, w: int = 64, h: int = 64):
    """A random image, a rectangle mask (white = hole) and an example image, as files."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / "img.png")
    hole = np.zeros((h, w), bool)
    hole[h // 4: h // 2 + 5, w // 3: w - 7] = True
    Image.fromarray(hole).save(folder / "mask.png")
    Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(folder / "example.png")
    return folder / "img.png", folder / "mask.png", folder / "example.png", hole


BUILD = {  # family -> (pipeline, what the edit passes for text)
    "sd": lambda tmp: (tiny.sd(tmp), {"prompt": "a red cat"}),
    "sdxl": lambda tmp: (tiny.sdxl(latents_stats=True), tiny.prompt_embeds("sdxl")),
    "pbe": lambda tmp: (tiny.paint_by_example(), {}),
    "flux": lambda tmp: (tiny.flux(), tiny.prompt_embeds("flux")),
}


@pytest.mark.parametrize("family", sorted(BUILD))
def test_one_run_two_decodes(family, tmp_path, spy):
    pipe, text = BUILD[family](tmp_path)
    asym = tiny.asym_for(pipe.vae)
    assert editing.check_encoder(pipe.vae, asym)
    image, mask, example, hole = inputs(tmp_path)
    prep = editing.prepare(image, mask, multiple=pipelines.size_multiple(pipe),
                           example_path=example if family == "pbe" else None)
    spy["perfect"] = True
    out = editing.edit(pipe, asym, prep, seed=3, steps=2, num_images=2, **text)
    assert [len(out[k]) for k in ("vanilla", "asym")] == [2, 2]

    # One decode each, of the very same latents (FLUX: unpacked to 16 x 8 x 8).
    (ours,), (theirs,) = spy["asym"], spy["vanilla"]
    assert ours["z"].shape == (2, pipe.vae.config.latent_channels, 8, 8) and torch.equal(ours["z"], theirs["z"])
    # Ours got the source image and the mask as drawn (1 = hole), by keyword, one row per sample.
    img, m = ours["kw"]["image"], ours["kw"]["mask"]
    assert img.shape == (2, 3, 64, 64) and m.shape == (2, 1, 64, 64)
    assert torch.equal(m[0, 0], torch.from_numpy(hole).float()) and torch.equal(m[1], m[0])
    source = torch.from_numpy(np.asarray(Image.open(image), dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
    torch.testing.assert_close(img[1], source, atol=1e-6, rtol=0)

    # The vanilla result is exactly what the pipeline itself decodes from the same seed.
    call = dict(image=prep.image, mask_image=prep.mask, height=64, width=64, num_inference_steps=2,
                num_images_per_prompt=2, generator=torch.Generator().manual_seed(3), **text)
    if family == "pbe":
        call["example_image"] = prep.example
    reference = pipe(**call).images
    for a, b in zip(out["vanilla"], reference):
        assert np.array_equal(np.asarray(a), np.asarray(b))

    # Known pixels: the perfect stand-in keeps them exactly; the (random) vanilla VAE does not.
    errors = {k: [editing.known_pixel_error(prep.original, im, prep.original_mask) for im in ims]
              for k, ims in out.items()}
    assert max(errors["asym"]) < 1e-3 < 100 < min(errors["vanilla"])


def test_paint_by_example_mask_convention(tmp_path, spy, monkeypatch):
    """Paint-by-Example inverts masks (1 = keep inside the pipeline); users and our decoder use 1 = hole.
    The pipeline must repaint the white region, and our decoder must see it as the hole."""
    from diffusers import PaintByExamplePipeline

    module = sys.modules[PaintByExamplePipeline.__module__]
    kept = []
    original = module.prepare_mask_and_masked_image

    def record(image, mask):
        keep, masked = original(image, mask)
        kept.append(keep.clone())
        return keep, masked

    monkeypatch.setattr(module, "prepare_mask_and_masked_image", record)
    pipe = tiny.paint_by_example()
    image, mask, example, hole = inputs(tmp_path)
    prep = editing.prepare(image, mask, example_path=example)
    spy["perfect"] = True
    out = editing.edit(pipe, tiny.asym_for(pipe.vae), prep, steps=1)
    assert kept and all(torch.equal(k[0, 0], torch.from_numpy(~hole).float()) for k in kept)  # pipeline: 1 = keep
    assert torch.equal(spy["asym"][0]["kw"]["mask"][0, 0], torch.from_numpy(hole).float())  # ours: 1 = hole
    assert editing.known_pixel_error(prep.original, out["asym"][0], prep.original_mask) < 1e-3


def test_flux_16_channel_decoder_t2i_and_tile(spy, tmp_path, caplog):
    """FLUX.1 text-to-image: packed latents, shift and scale from the VAE config, our 16-channel
    decoder (no quant convs) as a plain decoder; --tile reaches both decoders."""
    pipe = tiny.flux(fill=False)
    asym = tiny.asym_for(pipe.vae)
    assert asym.latent_channels == 16 and asym.quant_conv is None and asym.post_quant_conv is None
    assert asym.shift_factor == pipe.vae.config.shift_factor == 0.1159
    # Exported to diffusers (identity quant convs, no shift_factor in its config) it still matches.
    to_diffusers(asym).save_pretrained(tmp_path / "asym")
    caplog.clear()
    assert editing.check_encoder(pipe.vae, editing.load_asym(tmp_path / "asym")) and "differs" not in caplog.text
    prep = editing.prepare_size(60, 40, pipelines.size_multiple(pipe))  # FLUX: multiples of 16
    assert prep.work_size == (64, 48)
    out = editing.edit(pipe, asym, prep, seed=5, steps=2, **tiny.prompt_embeds("flux"))
    (ours,) = spy["asym"]
    assert ours["z"].shape == (1, 16, 6, 8) and ours["kw"] == {}  # plain path: no image, no mask
    assert out["asym"][0].size == out["vanilla"][0].size == (60, 40)
    reference = pipe(height=48, width=64, num_inference_steps=2, generator=torch.Generator().manual_seed(5),
                     **tiny.prompt_embeds("flux")).images[0]
    assert np.array_equal(np.asarray(out["vanilla"][0]), np.asarray(reference.crop((0, 0, 60, 40))))

    editing.edit(pipe, asym, prep, seed=5, steps=2, tile=4, **tiny.prompt_embeds("flux"))
    assert spy["asym"][-1]["kw"] == {"tile": 4}
    assert spy["vanilla"][-1]["tiles"] == (True, 4, 32) and not pipe.vae.use_tiling  # diffusers' tiling, then off


def test_sdxl_t2i_matches_pipeline(spy):
    """SDXL text-to-image, with per-channel latents_mean / latents_std in the VAE config."""
    pipe = tiny.sdxl(inpaint=False, latents_stats=True)
    out = editing.edit(pipe, tiny.asym_for(pipe.vae), editing.prepare_size(64, 64), seed=2, steps=2,
                       **tiny.prompt_embeds("sdxl"))
    assert spy["asym"][0]["kw"] == {} and torch.equal(spy["asym"][0]["z"], spy["vanilla"][0]["z"])
    reference = pipe(height=64, width=64, num_inference_steps=2, generator=torch.Generator().manual_seed(2),
                     **tiny.prompt_embeds("sdxl")).images[0]
    assert np.array_equal(np.asarray(out["vanilla"][0]), np.asarray(reference))


def test_t2i_condition_by_blend():
    """add / none: the plain path (exactly the all-ones mask for add). concat: the all-ones mask it was
    trained with, which its blend conv does not turn into the identity."""
    vae = tiny.make_vae(tiny.TINY_VAE)
    z = torch.randn(2, 4, 3, 5)
    assert pipelines.t2i_condition(tiny.asym_for(vae), z) is None
    concat = tiny.asym_for(vae, blend="concat")
    image, mask = pipelines.t2i_condition(concat, z)
    assert image.shape == (2, 3, 24, 40) and mask.shape == (2, 1, 24, 40)
    assert mask.min() == 1 and image.abs().max() == 0


def test_cli_text_to_image(tmp_path, spy):
    """--task auto from the folder's class (StableDiffusionPipeline -> t2i); odd size cropped back."""
    tiny.sd(tmp_path, inpaint=False).save_pretrained(tmp_path / "pipe")
    pipe = editing.load_pipeline(tmp_path / "pipe", torch.device("cpu"), torch.float32)
    to_diffusers(tiny.asym_for(pipe.vae)).save_pretrained(tmp_path / "asym")
    args = ["--pipeline", str(tmp_path / "pipe"), "--ckpt", str(tmp_path / "asym"), "--prompt", "a cat",
            "--width", "60", "--height", "44", "--steps", "2", "--out", str(tmp_path / "out")]
    assert edit_script().main(args) == 0
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["t2i_asym_0.png", "t2i_compare.png", "t2i_vanilla_0.png"]
    assert Image.open(tmp_path / "out" / "t2i_asym_0.png").size == (60, 44)
    assert Image.open(tmp_path / "out" / "t2i_compare.png").size == (120, 44)
    (ours,) = spy["asym"]
    assert ours["kw"] == {}
    reference = pipe("a cat", height=48, width=64, num_inference_steps=2,
                     generator=torch.Generator().manual_seed(0)).images[0].crop((0, 0, 60, 44))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "t2i_vanilla_0.png")), np.asarray(reference))


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_cli_inpaint_with_text_encoders(family, tmp_path, spy):
    """SDXL inpainting and FLUX.1 Fill as the README runs them: from saved folders with their own (tiny)
    text encoders and tokenizers (FLUX: CLIP + T5), --prompt encoded by the pipeline itself."""
    built = tiny.sdxl(latents_stats=True, text_folder=tmp_path / "text") if family == "sdxl" \
        else tiny.flux(text_folder=tmp_path / "text")
    built.save_pretrained(tmp_path / "pipe")
    pipe = editing.load_pipeline(tmp_path / "pipe", torch.device("cpu"), torch.float32)
    assert type(pipe) is type(built)
    assert all(getattr(pipe, k) is not None for k in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"))
    if family == "flux":  # the T5 tokenizer round-trips: "▁" (3) and letters (4 + i), </s> (1), <pad> (0)
        word = lambda w: [3] + [4 + ord(c) - ord("a") for c in w]  # noqa: E731
        for tok in (built.tokenizer_2, pipe.tokenizer_2):
            ids = tok("a red bench", padding="max_length", max_length=16).input_ids
            assert ids == word("a") + word("red") + word("bench") + [1, 0, 0, 0]
    to_diffusers(tiny.asym_for(pipe.vae)).save_pretrained(tmp_path / "asym")
    image, mask, _, hole = inputs(tmp_path)
    args = ["--pipeline", str(tmp_path / "pipe"), "--ckpt", str(tmp_path / "asym"), "--image", str(image),
            "--mask", str(mask), "--prompt", "a red bench", "--steps", "2", "--out", str(tmp_path / "out")]
    assert edit_script().main(args) == 0
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["img_asym_0.png", "img_compare.png", "img_vanilla_0.png"]
    assert Image.open(out / "img_asym_0.png").size == Image.open(out / "img_vanilla_0.png").size == (64, 64)
    assert Image.open(out / "img_compare.png").size == (4 * 64, 64)  # input | mask | vanilla | asym
    (ours,), (theirs,) = spy["asym"], spy["vanilla"]
    assert ours["z"].shape == (1, pipe.vae.config.latent_channels, 8, 8) and torch.equal(ours["z"], theirs["z"])
    assert torch.equal(ours["kw"]["mask"][0, 0], torch.from_numpy(hole).float())
    # The vanilla result is what the pipeline itself makes of the prompt (through its text encoders),
    # and the prompt matters.
    prep = editing.prepare(image, mask, multiple=pipelines.size_multiple(pipe))
    reference = {prompt: np.asarray(pipe(prompt, image=prep.image, mask_image=prep.mask, height=64, width=64,
                                         num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0])
                 for prompt in ("a red bench", "a blue cat")}
    assert np.array_equal(np.asarray(Image.open(out / "img_vanilla_0.png")), reference["a red bench"])
    assert not np.array_equal(reference["a red bench"], reference["a blue cat"])


@pytest.fixture(scope="module")
def pbe_folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pbe")
    pipe = tiny.paint_by_example()
    pipe.save_pretrained(tmp / "pipe")
    to_diffusers(tiny.asym_for(pipe.vae)).save_pretrained(tmp / "asym")
    return tmp / "pipe", tmp / "asym"


@pytest.mark.parametrize("library", ["diffusers", "paint_by_example"])
def test_cli_paint_by_example(pbe_folders, tmp_path, spy, library):
    """From a saved folder, odd size, two samples. diffusers 0.42.1's from_pretrained fails on both ways
    a model_index.json names the image encoder: as its own save_pretrained writes it ("diffusers",
    a class it does not export) and as diffusers wrote it while the pipeline lived in
    pipelines/paint_by_example; `load_pipeline` loads the components itself."""
    folder = tmp_path / "pipe"
    shutil.copytree(pbe_folders[0], folder)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["image_encoder"] == ["diffusers", "PaintByExampleImageEncoder"]
    index["image_encoder"][0] = library
    (folder / "model_index.json").write_text(json.dumps(index))
    image, mask, example, _ = inputs(tmp_path, w=70, h=50)  # padded to 72 x 56, cropped back
    args = ["--pipeline", str(folder), "--ckpt", str(pbe_folders[1]), "--image", str(image), "--mask",
            str(mask), "--example", str(example), "--steps", "1", "--num-images", "2", "--out", str(tmp_path / "o")]
    assert edit_script().main(args) == 0
    out = tmp_path / "o"
    for kind in ("asym", "vanilla"):
        for k in range(2):
            assert Image.open(out / f"img_{kind}_{k}.png").size == (70, 50)
    assert Image.open(out / "img_compare.png").size == (5 * 70, 2 * 50)  # input | mask | example | vanilla | asym
    (ours,) = spy["asym"]
    assert ours["kw"]["mask"].shape == (2, 1, 56, 72)


def test_cli_errors(pbe_folders, tmp_path, capsys):
    image, mask, example, _ = inputs(tmp_path)
    base = ["--pipeline", str(pbe_folders[0]), "--ckpt", str(pbe_folders[1]), "--out", str(tmp_path / "o"),
            "--steps", "1"]
    main = edit_script().main
    cases = [  # (extra args, expected message); all before or instead of any output
        (["--image", str(image), "--mask", str(mask)], "--task example needs --example"),
        (["--task", "t2i", "--prompt", "x"], "--task t2i needs one of StableDiffusionPipeline"),
        (["--image", str(image), "--mask", str(mask), "--example", str(example), "--prompt", "a cat"],
         "does not take --prompt"),
        (["--image", str(image), "--mask", str(mask), "--example", str(tmp_path / "nope.png")],
         f"--example {tmp_path / 'nope.png'}: file not found"),
    ]
    for extra, message in cases:
        assert main(base + extra) == 1, extra
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "--example" in capsys.readouterr().out
