"""Paint-by-Example and text-to-image evaluation: region CLIP score and pre error by hand, FID / IS
through torchmetrics with stand-in networks, missing weights reported, the real loading paths offline."""

import csv
import importlib.util
import json
import math
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ldm_asym.eval import inception as IN
from ldm_asym.eval import models as MD
from ldm_asym.eval import pbe
from ldm_asym.eval.data import FolderSet

pytestmark = pytest.mark.usefixtures("one_thread")
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # OpenAI CLIP's


def script(name):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random CLIP ViT (patch 32 at 224, as ViT-B/32) with 16-wide layers, saved as a local folder."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=224, patch_size=32, projection_dim=8)
    folder = tmp_path_factory.mktemp("clip")
    CLIPVisionModelWithProjection(cfg).save_pretrained(folder)
    CLIPImageProcessor().save_pretrained(folder)
    return folder


class ChannelStats(torch.nn.Module):
    """Stand-in for Inception's pool features: per-channel mean and std of the uint8 image."""

    num_features = 6

    def forward(self, x):
        assert x.dtype == torch.uint8
        x = x.float()
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], 1)


class ChannelLogits(torch.nn.Module):
    """Stand-in for Inception's logits: 4 classes from the channel means."""

    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.tensor([[1.0, -1, 0.5, 0], [0, 1, -1, 0.5], [-0.5, 0, 1, 1]]) / 40)

    def forward(self, x):
        return x.float().mean(dim=(2, 3)) @ self.w


def stand_in_inception(weights=None, feature="2048"):
    return ChannelStats() if feature == "2048" else ChannelLogits()


def save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def hand_region_clip(folder, result_png, box, ref_png):
    """The COCOEE region CLIP score written out: crop, resize to 224, CLIP normalisation, 100·cos."""
    from transformers import CLIPVisionModelWithProjection

    top, left, bottom, right = box
    res = torch.from_numpy(np.asarray(Image.open(result_png).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
    crop = F.interpolate(res[None, :, top:bottom, left:right], size=(224, 224), mode="bilinear",
                         align_corners=False, antialias=True)
    ref = Image.open(ref_png).convert("RGB").resize((224, 224), Image.BICUBIC)
    ref = torch.from_numpy(np.asarray(ref, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    model = CLIPVisionModelWithProjection.from_pretrained(folder).eval()
    with torch.no_grad():
        a, b = (model(pixel_values=(t - mean) / std).image_embeds[0] for t in (crop, ref))
    return float(100 * (a @ b) / (a.norm() * b.norm()))


@pytest.fixture
def cocoee(tmp_path):
    """Two samples in COCOEE's layout: results/N.png, GT/N_GT.png, masks/N_mask.png, refs/N_ref.png.

    Sample 000001: the source is the result + 10 (uint8) on known pixels and + 60 in the box
    (rows 10..249, cols 5..234: larger than 224, so the resize filters down). Sample 000002: a source
    twice the result's size (resized).
    """
    g = np.random.default_rng(0)
    res1 = g.integers(20, 180, (260, 240, 3), dtype=np.uint8)
    mask1 = np.zeros((260, 240), np.uint8)
    mask1[10:250, 5:235] = 255
    src1 = (res1 + np.where(mask1[..., None] > 0, 60, 10)).astype(np.uint8)
    root = tmp_path / "cocoee"
    files = {"result": save(root / "results" / "000001.png", res1), "src": save(root / "GT" / "000001_GT.png", src1),
             "mask": save(root / "masks" / "000001_mask.png", mask1),
             "ref": save(root / "refs" / "000001_ref.png", g.integers(0, 255, (50, 70, 3), dtype=np.uint8))}
    save(root / "results" / "000002.png", g.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    save(root / "GT" / "000002_GT.png", g.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    save(root / "masks" / "000002_mask.png", np.pad(np.full((8, 8), 255, np.uint8), 12))
    save(root / "refs" / "000002_ref.png", g.integers(0, 255, (20, 20, 3), dtype=np.uint8))
    return root, files


def rows_of(path):
    with open(path) as f:
        return {r["image"]: r for r in csv.DictReader(f)}


def test_pbe_region_clip_score_and_pre_error_by_hand(cocoee, tiny_clip, tmp_path, monkeypatch, offline, capsys):
    root, f = cocoee
    monkeypatch.setattr(MD, "build_inception", stand_in_inception)
    out = tmp_path / "out"
    argv = ["--task", "pbe", "--results", str(root / "results"), "--sources", str(root / "GT"), "--masks",
            str(root / "masks"), "--references", str(root / "refs"), "--clip", str(tiny_clip), "--size", "32",
            "--out", str(out)]
    assert script("evaluate").main(argv) == 0
    rows, summary = rows_of(out / "per_image.csv"), json.loads((out / "summary.json").read_text())

    # The box is rows 10..249, cols 5..234 (end-exclusive 250, 235), written out independently of pbe.mask_box.
    expected = hand_region_clip(tiny_clip, f["result"], (10, 5, 250, 235), f["ref"])
    assert float(rows["000001"]["clip_score"]) == pytest.approx(expected, abs=1e-4)
    assert pbe.mask_box(torch.from_numpy(np.asarray(Image.open(f["mask"])) > 0)) == (10, 5, 250, 235)
    known = 260 * 240 - 240 * 230  # the +60 in the box is ignored; +10/255 on every known pixel and channel
    assert float(rows["000001"]["pre_error_mse"]) == pytest.approx((10 / 255) ** 2, rel=1e-5)
    assert float(rows["000001"]["pre_error_sse"]) == pytest.approx((10 / 255) ** 2 * 3 * known, rel=1e-5)
    assert float(rows["000001"]["hole_fraction"]) == pytest.approx(240 * 230 / (260 * 240))

    m = summary["metrics"]
    assert m["clip_score"]["n"] == 2 and m["clip_score"]["mean"] == pytest.approx(
        np.mean([float(r["clip_score"]) for r in rows.values()]), rel=1e-6)
    assert summary["config"]["clip_size"] == 224 and "1 sources or masks were resized" in summary["warnings"][0]
    # FID: torchmetrics through the stand-in network, results against the sources (the default reference)
    fid = IN.FIDSet(ChannelStats(), ["fake"])
    for folder, add in (("GT", fid.add_real), ("results", lambda x: fid.add("fake", x))):
        add(torch.stack([FolderSet(sorted((root / folder).iterdir()), 32)[i]["image"] for i in range(2)]))
    assert m["fid"]["available"] and m["fid"]["value"] == pytest.approx(fid.compute("fake"), rel=1e-6)
    assert "| results |" in (out / "summary.md").read_text() and "wrote" in capsys.readouterr().out


def test_pbe_missing_weights_are_reported_with_what_to_pass(cocoee, tmp_path, monkeypatch, offline):
    root, _ = cocoee
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # no Inception file there
    out = tmp_path / "out"
    s = pbe.evaluate_pbe(str(root / "results"), str(root / "GT"), str(root / "masks"), str(root / "refs"), str(out),
                         clip=str(tmp_path / "no-clip"), size=32)
    m = s["metrics"]
    assert not m["clip_score"]["available"] and f"CLIP folder not found: {tmp_path / 'no-clip'}" in m["clip_score"]["reason"]
    assert not m["fid"]["available"] and "--inception-weights" in m["fid"]["reason"]
    assert m["pre_error_mse"]["available"] and m["pre_error_mse"]["n"] == 2  # the rest is still computed
    assert rows_of(out / "per_image.csv")["000001"]["clip_score"] == ""  # unavailable: an empty cell
    with pytest.raises(MD.Unavailable, match="pass --clip DIR"):
        MD.build_clip(None)
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    (incomplete / "config.json").write_text("{}")
    with pytest.raises(MD.Unavailable, match=f"cannot load CLIP from {incomplete}"):
        MD.build_clip(incomplete)


def test_pbe_pairing_errors_name_the_folder(cocoee):
    root, _ = cocoee
    (root / "refs" / "000002_ref.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 2 samples have no file in --references .*000002\.png"):
        pbe.evaluate_pbe(str(root / "results"), str(root / "GT"), str(root / "masks"), str(root / "refs"),
                         str(root / "out"))


def folder_of(root, n, seed, size=16):
    g = np.random.default_rng(seed)
    for i in range(n):
        save(root / f"{i:03d}.png", g.integers(0, 255, (size, size, 3), dtype=np.uint8))
    return root


@pytest.mark.filterwarnings("ignore:std\\(\\)")  # one split has no std
def test_t2i_fid_and_inception_score(tmp_path, monkeypatch, offline):
    monkeypatch.setattr(MD, "build_inception", stand_in_inception)
    gen, ref = folder_of(tmp_path / "gen", 12, 1), folder_of(tmp_path / "ref", 6, 2)
    out = tmp_path / "out"
    assert script("evaluate").main(["--task", "t2i", "--results", str(gen), "--fid-reference", str(ref),
                                    "--size", "16", "--is-splits", "3", "--out", str(out)]) == 0
    m = json.loads((out / "summary.json").read_text())["metrics"]
    images = lambda d: torch.stack([FolderSet(sorted(d.iterdir()), 16)[i]["image"]  # noqa: E731
                                    for i in range(len(list(d.iterdir())))])
    fid = IN.FIDSet(ChannelStats(), ["g"])
    fid.add_real(images(ref))
    fid.add("g", images(gen))
    assert m["fid"]["value"] == pytest.approx(fid.compute("g"), rel=1e-6) and m["fid"]["n"] == 12
    assert m["inception_score"]["splits"] == 3 and m["inception_score"]["n"] == 12

    # One split: exp(mean KL(p(y|x) || p(y))) written out.
    score = IN.InceptionScoreSet(ChannelLogits(), splits=1)
    score.add(images(gen))
    p = ChannelLogits()(IN.to_uint8(images(gen))).double().softmax(1)
    expected = math.exp((p * (p.log() - p.mean(0, keepdim=True).log())).sum(1).mean())
    assert score.compute()["mean"] == pytest.approx(expected, rel=1e-5)
    assert expected > 1.001  # the stand-in's classes do differ between images
    few = IN.InceptionScoreSet(ChannelLogits(), splits=20)
    few.add(images(gen))
    with pytest.raises(MD.Unavailable, match="20 splits needs at least 20 images; got 12"):
        few.compute()


def test_evaluate_cli_refuses_options_of_another_task(tmp_path, capsys):
    main = script("evaluate").main
    with pytest.raises(SystemExit):
        main(["--task", "t2i", "--results", str(tmp_path), "--out", str(tmp_path / "o")])
    assert "--task t2i needs --fid-reference" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--task", "pbe", "--ckpt", "x", "--results", "r", "--sources", "s", "--masks", "m",
              "--references", "f", "--out", str(tmp_path / "o")])
    assert "--ckpt not used by --task pbe" in capsys.readouterr().err


def test_real_inception_loads_from_a_local_file_without_network(tmp_path, offline):
    """torch-fidelity's network, random weights in its file format: loaded from the path, never downloaded."""
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as fe
    from torchmetrics.image.fid import NoTrainInceptionV3

    with mock.patch.object(fe.torch, "load", lambda *a, **k: None), \
            mock.patch.object(NoTrainInceptionV3, "load_state_dict", lambda self, sd: None):
        blank = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path="-")
    weights = tmp_path / MD.INCEPTION_FILE
    torch.save(blank.state_dict(), weights)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    pool = MD.build_inception(weights)
    with torch.no_grad():
        assert MD.build_inception(weights, "logits_unbiased")(images).shape == (2, 1008)
    fid = IN.FIDSet(pool, ["x"])  # torchmetrics takes it as is (num_features set: no dummy pass)
    fid.add_real(torch.rand(2, 3, 32, 32) * 2 - 1)
    fid.add("x", torch.rand(2, 3, 32, 32) * 2 - 1)
    assert fid.real.real_features_sum.shape == (2048,) and math.isfinite(fid.compute("x"))
