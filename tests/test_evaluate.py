"""Evaluation: aggregation against hand-computed values, inputs, outputs, and the CLI end to end."""

import csv
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_VAE, make_asym, make_vae
from ldm_asym import metrics as M
from ldm_asym.eval import data as D
from ldm_asym.eval import decoders as V
from ldm_asym.eval import inception as IN
from ldm_asym.eval import inpainting as I
from ldm_asym.eval import models as MD
from ldm_asym.eval import report as R

EXAMPLES = Path(__file__).parents[1].parent / "shared/data/inpainting_examples"
needs_examples = pytest.mark.skipif(not (EXAMPLES / "bench2_mask.png").is_file(),
                                    reason=f"example photos not found at {EXAMPLES}")


pytestmark = pytest.mark.usefixtures("one_thread")


def script(name):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rect_mask(b, h, w):
    m = torch.zeros(b, 1, h, w)
    m[..., 8:20, 10:26] = 1
    return m


def batch(b=2, h=32, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    # in [-0.5, 0.5]: a +0.2 offset never clips
    return {"name": [f"im{i}" for i in range(b)], "image": torch.rand(b, 3, h, w, generator=g) - 0.5,
            "mask": rect_mask(b, h, w)}


# ---------------------------------------------------------------------- aggregation
def test_identity_and_offset_decoders_give_hand_computed_values(tmp_path):
    b = batch()
    res = I.run([b], lambda image, mask: {"ours": image.clone(), "offset": image + 0.2}, lpips={})
    known = 32 * 32 - 12 * 16
    rows = {(r["image"], r["decoder"]): r for r in res.rows}
    assert len(rows) == 4
    for name in b["name"]:
        same, off = rows[(name, "ours")], rows[(name, "offset")]
        assert same["psnr"] == same["psnr_known"] == M.PSNR_MAX_DB
        assert same["unmasked_mse"] == same["unmasked_sse"] == 0
        assert same["ssim"] == pytest.approx(1.0, abs=1e-6)
        # +0.2 in [-1, 1] is +0.1 in [0, 1]: MSE 0.01 everywhere -> 20 dB
        for key in ("psnr", "psnr_known", "psnr_hole"):
            assert off[key] == pytest.approx(20.0, abs=1e-4)
        assert off["unmasked_mse"] == pytest.approx(0.01, rel=1e-5)
        assert off["unmasked_mse_1e5"] == pytest.approx(1000.0, rel=1e-5)
        assert off["unmasked_sse"] == pytest.approx(0.01 * 3 * known, rel=1e-5)
        assert same["hole_fraction"] == pytest.approx(12 * 16 / 1024)

    reason = "vgg16-397923af.pth not in the hub cache"
    unavailable = {"lpips_vgg": reason, "lpips_vgg_band": reason, "fid": "no weights"}
    summary = I.summarise(res, unavailable)
    assert summary["offset"]["psnr"] == {"available": True, "mean": pytest.approx(20.0, abs=1e-4),
                                         "std": pytest.approx(0, abs=1e-4), "n": 2}
    assert summary["ours"]["lpips_vgg"] == {"available": False, "reason": reason}
    assert summary["ours"]["fid"] == {"available": False, "reason": "no weights"}
    # never dropped: a metric that was simply not computed still has an entry
    assert summary["ours"]["lpips_alex"]["available"] is False

    I.write_csv(tmp_path / "per_image.csv", res.rows)
    with open(tmp_path / "per_image.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert list(csv_rows[0]) == ["image", "decoder", "hole_fraction", *I.PER_IMAGE]
    assert csv_rows[0]["lpips_vgg"] == ""  # unavailable: an empty cell, the column is still there
    for dec in ("ours", "offset"):
        for key in ("psnr", "unmasked_sse", "ssim_hole"):
            vals = [float(r[key]) for r in csv_rows if r["decoder"] == dec]
            assert np.mean(vals) == pytest.approx(summary[dec][key]["mean"], rel=1e-5)
    md = I.markdown({"config": dict(n_images=2, size=32, masks="m", ckpt="c", baseline="b", latents="L"),
                     "decoders": summary})
    assert "| offset | 20 |" in md and reason in md


def test_empty_hole_gives_nan_not_a_crash():
    b = batch()
    b["mask"] = torch.zeros_like(b["mask"])
    res = I.run([b], lambda image, mask: {"ours": image + 0.2}, lpips={})
    s = I.summarise(res, {})["ours"]
    assert s["psnr_hole"]["n"] == 0 and math.isnan(s["psnr_hole"]["mean"])
    assert R.no_nan(s)["psnr_hole"]["mean"] is None  # summary.json stays strict JSON


class _Posterior:
    def __init__(self, z):
        self.z = z

    def mode(self):
        return self.z


class _Stub:
    """encode: identity latents (scaled); decode: a fixed function, so outputs are hand-computable."""

    def __init__(self, scale):
        self.scale, self.encoded = scale, 0

    def encode(self, x):
        self.encoded += 1
        return _Posterior(x * self.scale)

    def decode(self, z, image=None, mask=None):
        out = z * 0.5
        return out if image is None else out + mask  # anything that depends on the mask


@pytest.mark.parametrize("shared", [True, False])
def test_paste_keeps_known_pixels_exactly_and_latents_are_shared(shared):
    model, base = _Stub(1.0), _Stub(-1.0)
    image = torch.rand(2, 3, 16, 16) * 2 - 1
    soft = torch.rand(2, 1, 16, 16)  # binarised at 0.5 everywhere
    outs = V.Reconstructor(model, base, shared_latents=shared)(image, soft)
    hole = soft >= 0.5
    vanilla = image * (0.5 if shared else -0.5)
    assert torch.equal(outs["vanilla"], vanilla.clamp(-1, 1))
    assert torch.equal(outs["paste"][~hole.expand_as(image)], image[~hole.expand_as(image)])
    assert torch.equal(outs["paste"][hole.expand_as(image)], outs["vanilla"][hole.expand_as(image)])
    assert torch.equal(outs["ours"], (image * 0.5 + hole.float()).clamp(-1, 1))  # got the binary mask
    assert base.encoded == (0 if shared else 1)
    scores = I.image_metrics(outs["paste"], image, soft, {})
    assert (scores["unmasked_sse"] == 0).all() and (scores["psnr_known"] == M.PSNR_MAX_DB).all()


class PixelMean(torch.nn.Module):
    """A one-feature stand-in "Inception": uint8 images -> their mean value."""

    num_features = 1

    def forward(self, x):
        assert x.dtype == torch.uint8  # FIDSet quantises, as saved images would be
        return x.float().mean(dim=(1, 2, 3))[:, None]


class ChannelStats(torch.nn.Module):
    """A six-feature stand-in: per-channel mean and std of the uint8 image."""

    def forward(self, x):
        x = x.float()
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], 1)


def flat(values):
    """Constant images whose uint8 pixel value is each of `values` ([-1, 1] in, exact after quantisation)."""
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, 4, 4) / 127.5 - 1


def test_fid_is_torchmetrics_closed_form_on_one_feature():
    # real features 10, 20, 30, 40: mean 25, unbiased variance 500/3; fake 12, 16: mean 14, variance 8.
    fid = IN.FIDSet(PixelMean(), ["a", "b"])
    fid.add_real(flat([10, 20]))
    fid.add_real(flat([30, 40]))  # accumulated over batches, shared by every set
    fid.add("a", flat([12, 16]))
    fid.add("b", flat([10, 20, 30, 40]))
    s1, s2 = 500 / 3, 8.0
    expected = (25 - 14) ** 2 + s1 + s2 - 2 * math.sqrt(s1 * s2)
    assert fid.compute("a") == pytest.approx(expected, rel=1e-6)
    assert fid.compute("a") == pytest.approx(expected, rel=1e-6)  # the real state is merged once only
    assert fid.compute("b") == pytest.approx(0, abs=1e-3)  # same distribution
    one = IN.FIDSet(PixelMean(), ["a"])
    one.add_real(flat([10, 20]))
    one.add("a", flat([10]))
    with pytest.raises(MD.Unavailable, match="at least 2 images; got 1"):
        one.compute("a")


def test_fid_agrees_with_scipy_and_the_previous_implementation():
    """Six features: against scipy's matrix square root, and the number the hand-written FID gave (2658.4950621936487)."""
    from scipy import linalg

    g = torch.Generator().manual_seed(0)
    real = torch.rand(16, 3, 8, 8, generator=g) * 2 - 1
    fake = torch.rand(16, 3, 8, 8, generator=g) * 1.6 - 0.6
    fid = IN.FIDSet(ChannelStats(), ["fake"])
    fid.add_real(real[:10])
    fid.add_real(real[10:])
    fid.add("fake", fake)
    f_fake, f_real = (ChannelStats()(IN.to_uint8(t)).double().numpy() for t in (fake, real))
    mu1, mu2 = f_fake.mean(0), f_real.mean(0)
    c1, c2 = np.cov(f_fake, rowvar=False), np.cov(f_real, rowvar=False)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(c1 + c2 - 2 * linalg.sqrtm(c1 @ c2).real)
    got = fid.compute("fake")
    assert got == pytest.approx(expected, rel=1e-6)
    assert got == pytest.approx(2658.4950621936487, rel=1e-6)  # the replaced hand-written FID, same inputs


def test_inception_unavailable_reasons(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(MD.Unavailable, match="--inception-weights"):
        MD.build_inception(None)
    with pytest.raises(MD.Unavailable, match="not found"):
        MD.build_inception(tmp_path / "nope.pth")


# ---------------------------------------------------------------------- inputs
@needs_examples
def test_rgb_soft_mask_is_read_in_the_image_geometry():
    mask = D.load_eval_mask(EXAMPLES / "bench2_mask.png", 64, (512, 512))
    rgb = np.asarray(Image.open(EXAMPLES / "bench2_mask.png"))
    assert rgb.ndim == 3  # the test is about the RGB one
    hole = np.asarray(Image.open(EXAMPLES / "bench2_mask.png").convert("L")) >= 128
    expected = hole.reshape(64, 8, 64, 8).mean(axis=(1, 3)) >= 0.5  # area downsampling, then 0.5
    assert mask.shape == (1, 64, 64) and set(mask.unique().tolist()) <= {0.0, 1.0}
    assert (mask[0].numpy().astype(bool) != expected).mean() < 0.002
    assert abs(mask.mean().item() - hole.mean()) < 0.01


def test_mask_follows_the_center_crop(tmp_path):
    # A 64x32 image keeps its middle 32 columns; a hole in columns 40..47 lands at 8..15 of the crop.
    Image.new("RGB", (64, 32)).save(tmp_path / "a.png")
    hole = np.zeros((32, 64), np.uint8)
    hole[4:12, 40:48] = 255
    Image.fromarray(hole).save(tmp_path / "a_mask.png")
    m = D.load_eval_mask(tmp_path / "a_mask.png", 32, (64, 32))[0]
    assert torch.nonzero(m).amin(0).tolist() == [4, 24] and m.sum() == 64
    Image.fromarray(hole[:, :32]).save(tmp_path / "b_mask.png")  # already size x size: taken as is
    as_is = D.load_eval_mask(tmp_path / "b_mask.png", 32, (64, 32))[0]
    assert torch.equal(as_is, torch.tensor(hole[:, :32] > 0).float())
    Image.fromarray(hole[:20]).save(tmp_path / "c_mask.png")
    with pytest.raises(ValueError, match="c_mask.png is 64x20"):
        D.load_eval_mask(tmp_path / "c_mask.png", 32, (64, 32))


def test_image_listing_and_mask_pairing_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        D.list_eval_images(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no images"):
        D.list_eval_images(tmp_path)
    for name in ("a.png", "b.jpg", "a_mask.png", "b_mask3.png"):
        Image.new("RGB", (16, 16)).save(tmp_path / name)
    images = D.list_eval_images(tmp_path)
    assert [p.name for p in images] == ["a.png", "b.jpg"]
    with pytest.raises(FileNotFoundError, match=r"no mask for .*b\.jpg: expected .*b_mask\.png"):
        D.pair_masks(images, tmp_path)
    pairs, missing = D.pair_masks(images, tmp_path, skip_missing=True)
    assert [p[1].name for p in pairs] == ["a_mask.png"] and [p.name for p in missing] == ["b.jpg"]


def test_preset_masks_are_deterministic_per_seed_and_index(tmp_path):
    for name in ("a.png", "b.png"):
        Image.new("RGB", (40, 48)).save(tmp_path / name)
    files = D.list_eval_images(tmp_path)
    one, two = D.EvalSet(files, 32, preset="thick", seed=3), D.EvalSet(files, 32, preset="thick", seed=3)
    assert torch.equal(one[1]["mask"], two[1]["mask"]) and not torch.equal(one[0]["mask"], one[1]["mask"])
    assert not torch.equal(one[0]["mask"], D.EvalSet(files, 32, preset="thick", seed=4)[0]["mask"])
    assert one[0]["image"].shape == (3, 32, 32) and one[0]["mask"].mean() <= 0.5


# ---------------------------------------------------------------------- models
@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """Tiny SD-style VAE and asymmetric VAE folders sharing the frozen encoder ("same VAE")."""
    root = tmp_path_factory.mktemp("models")
    vae, asym = make_vae(TINY_VAE, seed=1), make_asym("tiny", seed=2)
    frozen = {k: v for k, v in vae.state_dict().items()
              if k.startswith(("encoder.", "quant_conv.", "post_quant_conv."))}
    asym.load_state_dict(frozen, strict=False)
    vae.save_pretrained(root / "vae")
    asym.save_pretrained(root / "asym")
    return root / "asym", root / "vae"


def make_run(root: Path, asym_dir: Path, vae_source) -> Path:
    """A training run folder as ldm_asym.cli writes it: checkpoints/last.ckpt + configs/*-project.yaml."""
    from ldm_asym import load_autoencoder
    from ldm_asym.interop import META_KEY

    model = load_autoencoder(asym_dir)
    (root / "checkpoints").mkdir(parents=True)
    (root / "configs").mkdir()
    sd = {f"model.{k}": v for k, v in model.state_dict().items()}
    sd.update({f"ema_decoder.{k}": v for k, v in model.decoder.state_dict().items()})
    torch.save({"state_dict": sd,
                META_KEY: {"model_config": model.config()}, "hyper_parameters": {"vae_source": vae_source}},
               root / "checkpoints" / "last.ckpt")
    src = "null" if vae_source is None else f"'{vae_source}'"
    (root / "configs" / "2026-01-01T00-00-00-project.yaml").write_text(f"model:\n  params:\n    vae_source: {src}\n")
    return root


def test_default_baseline_from_run_folder_checkpoint_or_error(tmp_path, tiny_pair):
    asym, vae = tiny_pair
    run = make_run(tmp_path / "run", asym, str(vae))
    assert V.default_baseline(run) == (str(vae), str(next((run / "configs").glob("*.yaml"))))
    (next((run / "configs").glob("*.yaml"))).unlink()  # then the checkpoint's hyper_parameters
    assert V.default_baseline(run / "checkpoints" / "last.ckpt")[0] == str(vae)
    with pytest.raises(ValueError, match="--baseline"):
        V.default_baseline(asym)
    with pytest.raises(ValueError, match="vae_source: null"):
        V.default_baseline(make_run(tmp_path / "random", asym, None))


def test_compare_encoders(tiny_pair):
    from ldm_asym import load_autoencoder

    a, b = (load_autoencoder(p) for p in tiny_pair)
    assert V.compare_encoders(a, b) is None
    with torch.no_grad():
        b.encoder.conv_in.bias.add_(1)
    assert "1 of" in V.compare_encoders(a, b) and "encoder.conv_in.bias" in V.compare_encoders(a, b)


# ---------------------------------------------------------------------- CLI
@needs_examples
def test_evaluate_end_to_end_on_real_photos(tmp_path, tiny_pair, capsys):
    asym, vae = tiny_pair
    run = make_run(tmp_path / "run", asym, str(vae))  # default baseline: the run's vae_source
    data = tmp_path / "data"
    data.mkdir()
    names = ["bench2", "overture-creations-5sI6fQgYIuo", "alex-iby-G_Pk4D9rMLs"]  # two RGB masks
    for n in names:
        for f in (f"{n}.png", f"{n}_mask.png"):
            (data / f).symlink_to(EXAMPLES / f)
    Image.new("RGB", (64, 64)).save(data / "lonely.png")
    out = tmp_path / "out"
    argv = ["--ckpt", str(run), "--images", str(data), "--masks", str(data), "--size", "64", "--out", str(out),
            "--lpips-random", "--batch-size", "2", "--max-grids", "2", "--quiet"]
    assert script("evaluate").main(argv) == 1
    assert "lonely.png" in capsys.readouterr().err
    assert script("evaluate").main(argv + ["--skip-missing-masks", "--ema"]) == 0

    summary = json.loads((out / "summary.json").read_text())
    cfg = summary["config"]
    assert cfg["n_images"] == 3 and cfg["skipped_missing_masks"] == 1 and cfg["baseline"] == str(vae)
    assert cfg["ema"] is True and cfg["baseline_from"].endswith("-project.yaml")
    assert cfg["size"] == 64 and cfg["device"] == "cpu" and "same latents" in cfg["latents"]
    assert "random" in cfg["lpips"]
    assert set(summary["decoders"]) == {"vanilla", "paste", "ours"}
    for dec, entry in summary["decoders"].items():
        assert entry["fid"]["available"] is False and "--inception-weights" in entry["fid"]["reason"]
        assert all(entry[k]["available"] and entry[k]["n"] == 3 for k in I.PER_IMAGE)
        assert "tests only" in entry["lpips_vgg_band"]["note"]
    dec = summary["decoders"]
    assert dec["paste"]["unmasked_sse"]["mean"] == 0 and dec["paste"]["psnr_known"]["mean"] == 100
    assert dec["paste"]["psnr_hole"] == dec["vanilla"]["psnr_hole"]  # same hole pixels
    assert dec["vanilla"]["unmasked_mse"]["mean"] > 0

    with open(out / "per_image.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 9 and {r["image"] for r in rows} == set(names)
    for d in ("vanilla", "ours"):
        vals = [float(r["lpips_alex_band"]) for r in rows if r["decoder"] == d]
        assert np.mean(vals) == pytest.approx(dec[d]["lpips_alex_band"]["mean"], rel=1e-4)
    # the hand-drawn RGB masks were read as masks (hole fraction of the full-size drawing)
    for n in names[:2]:
        full = (np.asarray(Image.open(EXAMPLES / f"{n}_mask.png").convert("L")) >= 128).mean()
        got = {float(r["hole_fraction"]) for r in rows if r["image"] == n}
        assert len(got) == 1 and abs(got.pop() - full) < 0.01

    assert sorted(p.name for p in (out / "grids").iterdir()) == ["alex-iby-G_Pk4D9rMLs.png", "bench2.png"]
    with Image.open(out / "grids" / "bench2.png") as g:
        assert g.width == 6 * 128  # input, mask, vanilla, paste, ours, diff (64 px shown at 128)
    md = (out / "summary.md").read_text()
    assert "| paste |" in md and "fid** unavailable" in md


def test_evaluate_cli_errors(tmp_path, tiny_pair, capsys):
    asym, vae = tiny_pair
    main = script("evaluate").main
    assert main(["--ckpt", str(asym), "--images", str(tmp_path / "nope"), "--mask-preset", "thin",
                 "--out", str(tmp_path / "o")]) == 1
    assert "image folder not found" in capsys.readouterr().err
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    assert main(["--ckpt", str(asym), "--images", str(tmp_path), "--mask-preset", "thin",
                 "--out", str(tmp_path / "o")]) == 1
    assert "--baseline" in capsys.readouterr().err
    assert main(["--ckpt", str(asym), "--baseline", str(vae), "--images", str(tmp_path), "--mask-preset", "thin",
                 "--size", "60", "--out", str(tmp_path / "o")]) == 1
    assert "multiple of 8" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # exactly one of --masks / --mask-preset
        main(["--ckpt", str(asym), "--images", str(tmp_path), "--out", str(tmp_path / "o")])


# ---------------------------------------------------------------------- make_masks.py
def test_make_masks(tmp_path, capsys):
    from ldm_asym.data.masks import MaskGenerator, load_mask

    main = script("make_masks").main
    for name, size in (("a.png", (48, 32)), ("b.jpg", (40, 40))):
        Image.new("RGB", size).save(tmp_path / name)
    assert main(["--images", str(tmp_path), "--preset", "medium", "--seed", "7"]) == 0
    a = load_mask(tmp_path / "a_mask.png")
    assert a.shape == (1, 32, 48)  # the image's own size
    assert torch.equal(a, MaskGenerator("medium", (32, 48), p_full=0)(D.mask_seed(7, 0, 0)))
    assert main(["--images", str(tmp_path)]) == 1 and "--overwrite" in capsys.readouterr().err
    first = (tmp_path / "b_mask.png").read_bytes()
    assert main(["--images", str(tmp_path), "--preset", "medium", "--seed", "7", "--overwrite"]) == 0
    assert (tmp_path / "b_mask.png").read_bytes() == first  # deterministic
    assert [p.name for p in D.list_eval_images(tmp_path)] == ["a.png", "b.jpg"]  # masks aren't images

    out = tmp_path / "masks"
    assert main(["--images", str(tmp_path), "--count", "3", "--size", "32", "--out", str(out), "--seed", "7"]) == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == [f"{n}_mask{k}.png" for n in "ab" for k in range(3)]
    masks = [load_mask(out / f) for f in files]
    assert all(m.shape == (1, 32, 32) and 0 < m.mean() <= 0.5 for m in masks)
    assert not torch.equal(masks[0], masks[1])
    assert main(["--images", str(tmp_path / "nope")]) == 1 and "not found" in capsys.readouterr().err
