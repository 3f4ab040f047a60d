import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ldm_asym.data import datasets as ds_mod
from ldm_asym.data.datasets import (
    CACHE_NAME,
    FileListDataset,
    ImageFolderDataset,
    ImageNetDataset,
    SkimageDataset,
    UnusableImageError,
    load_image,
)


def _solid(path, color=(200, 50, 30), size=(40, 30), **save_kwargs):
    Image.new("RGB", size, color).save(path, **save_kwargs)
    return path


def _gradient(width, height):
    """R encodes x and G encodes y (each 0..255 across the image); B is constant."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, np.full_like(x, 128)], -1).round().astype(np.uint8))


def _rgb255(sample):
    """Dataset image tensor -> H×W×3 float array in 0..255."""
    return ((sample["image"].permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.float64)


def _crop_box(sample, width, height):
    """(x0, y0, side_x, side_y) of the crop in source pixels, from the gradient's first/last pixel centres."""
    img = _rgb255(sample)
    s = img.shape[0]
    px_x, px_y = (width - 1) / 255, (height - 1) / 255
    span_x = (img[:, -1, 0].mean() - img[:, 0, 0].mean()) * px_x
    span_y = (img[-1, :, 1].mean() - img[0, :, 1].mean()) * px_y
    side_x, side_y = span_x * s / (s - 1), span_y * s / (s - 1)
    x0 = img[:, 0, 0].mean() * px_x - side_x / (2 * s) + 0.5
    y0 = img[0, :, 1].mean() * px_y - side_y / (2 * s) + 0.5
    return x0, y0, side_x, side_y


def _folder(tmp_path, n=3, name="imgs"):
    root = tmp_path / name
    root.mkdir()
    for i in range(n):
        _solid(root / f"img{i}.png", color=(10 * i, 100, 200))
    return root


# --- output contract ----------------------------------------------------------------------------


def test_sample_contract(tmp_path):
    root = _folder(tmp_path)
    _solid(root / "photo.jpg", size=(300, 200), quality=90)
    for train in (True, False):
        ds = ImageFolderDataset(root, size=32, train=train, masks={"preset": "thick", "p_full": 0.0})
        assert len(ds) == 4
        for i in range(len(ds)):
            s = ds[i]
            assert set(s) == {"image", "mask", "index", "n_skipped"}
            assert s["image"].shape == (3, 32, 32) and s["image"].dtype == torch.float32
            assert -1.0 <= s["image"].min() and s["image"].max() <= 1.0
            assert s["mask"].shape == (1, 32, 32) and s["mask"].dtype == torch.float32
            assert set(s["mask"].unique().tolist()) <= {0.0, 1.0} and 0 < s["mask"].mean() < 1
            assert s["n_skipped"] == 0 and isinstance(s["n_skipped"], int)
    # Solid colour (200, 50, 30) survives decode + crop + resize.
    assert np.allclose(_rgb255(ds[3]).mean((0, 1)), (200, 50, 30), atol=3)
    with pytest.raises(IndexError):
        ds[4]
    assert len(list(ds)) == 4  # __getitem__ iteration stops instead of wrapping around


def test_collate_sums_skips(tmp_path):
    root = _folder(tmp_path, n=3)
    (root / "img1.png").write_bytes(b"")
    batch = next(iter(DataLoader(ImageFolderDataset(root, size=16, train=False), batch_size=3)))
    assert batch["image"].shape == (3, 3, 16, 16) and batch["mask"].shape == (3, 1, 16, 16)
    assert batch["n_skipped"].tolist() == [0, 1, 0] and int(batch["n_skipped"].sum()) == 1


def test_per_sample_seed_keys(tmp_path):
    # (index, seed) keys, as ldm_asym.train.data.ResumableSampler yields: crop and mask depend on the seed only.
    root = tmp_path / "grad"
    root.mkdir()
    _gradient(300, 200).save(root / "g.png")
    _gradient(200, 300).save(root / "h.png")
    ds = ImageFolderDataset(root, size=16, train=True)
    torch.manual_seed(0)
    a = ds[(0, 7)]
    torch.manual_seed(1)
    b = ds[(0, 7)]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    c = ds[(0, 8)]
    assert not torch.equal(a["image"], c["image"]) and not torch.equal(a["mask"], c["mask"])
    batch = next(iter(DataLoader(ds, sampler=[(0, 7), (1, 3)], batch_size=2)))
    assert torch.equal(batch["image"][0], a["image"]) and torch.equal(batch["mask"][0], a["mask"])
    with pytest.raises(IndexError):
        ds[(2, 7)]
    val = ImageFolderDataset(root, size=16, train=False)
    for key in ((1, 7), (1, 8)):  # validation ignores the seed: fixed per index
        assert torch.equal(val[key]["image"], val[1]["image"]) and torch.equal(val[key]["mask"], val[1]["mask"])


# --- transform --------------------------------------------------------------------------------------


def test_random_crop_is_square_and_in_range(tmp_path):
    root = tmp_path / "grad"
    root.mkdir()
    _gradient(400, 200).save(root / "g.png")
    ds = ImageFolderDataset(root, size=32, train=True, crop_min=0.5)
    torch.manual_seed(0)
    sides = []
    for _ in range(30):
        x0, y0, side_x, side_y = _crop_box(ds[0], 400, 200)
        assert side_x == pytest.approx(side_y, abs=4)  # square
        assert 100 - 4 <= side_x <= 200 + 4  # min(H, W) * [0.5, 1]
        assert -2 <= x0 and x0 + side_x <= 402 and -2 <= y0 and y0 + side_y <= 202
        sides.append(side_x)
    assert max(sides) - min(sides) > 50  # the scale really is random
    # Same torch seed, same crops and masks (worker seeding makes training reproducible).
    torch.manual_seed(1)
    a = ds[0]
    torch.manual_seed(1)
    b = ds[0]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])


def test_validation_is_centre_crop_and_deterministic(tmp_path):
    root = tmp_path / "grad"
    root.mkdir()
    _gradient(400, 200).save(root / "g.png")
    _gradient(200, 300).save(root / "h.png")
    ds = ImageFolderDataset(root, size=32, train=False)
    x0, y0, side_x, side_y = _crop_box(ds[0], 400, 200)
    assert x0 == pytest.approx(100, abs=3) and y0 == pytest.approx(0, abs=3)
    assert side_x == pytest.approx(200, abs=4) and side_y == pytest.approx(200, abs=4)
    x0, y0, side_x, _ = _crop_box(ds[1], 200, 300)
    assert x0 == pytest.approx(0, abs=3) and y0 == pytest.approx(50, abs=3) and side_x == pytest.approx(200, abs=4)
    torch.manual_seed(0)
    first = ds[1]
    torch.manual_seed(123)  # the global RNG must not matter for validation
    again = ds[1]
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["mask"], again["mask"])
    assert not torch.equal(ds[0]["mask"], ds[1]["mask"])  # masks seeded per index


def test_flip(tmp_path):
    root = tmp_path / "grad"
    root.mkdir()
    _gradient(64, 64).save(root / "g.png")
    torch.manual_seed(0)
    directions = set()
    for flip in (False, True):
        ds = ImageFolderDataset(root, size=16, train=True, flip=flip)
        for _ in range(20):
            img = _rgb255(ds[0])
            directions.add((flip, bool(img[:, -1, 0].mean() > img[:, 0, 0].mean())))
    assert directions == {(False, True), (True, True), (True, False)}


def test_jpeg_draft_decode_keeps_enough_resolution(tmp_path):
    path = tmp_path / "big.jpg"
    _gradient(1024, 768).save(path, quality=95)
    assert load_image(path).size == (1024, 768)
    assert load_image(path, min_side=100).size == (256, 192)  # 1/4 DCT scale, still >= 100
    assert load_image(path, min_side=200).size == (512, 384)
    # Through the dataset: a crop that is right in full-resolution coordinates.
    ds = ImageFolderDataset(tmp_path, size=32, train=False)
    x0, y0, side_x, side_y = _crop_box(ds[0], 1024, 768)
    assert x0 == pytest.approx(128, abs=8)
    assert side_x == pytest.approx(768, abs=12) and side_y == pytest.approx(768, abs=12)


def test_dataset_decodes_jpegs_at_no_less_than_output_resolution(tmp_path, monkeypatch):
    _gradient(2048, 1536).save(tmp_path / "big.jpg", quality=90)
    seen = []
    real_crop_resize = ds_mod.crop_resize

    def spy(im, size, crop):
        seen.append((min(im.size), round(crop.scale * min(im.size)), size))
        return real_crop_resize(im, size, crop)

    monkeypatch.setattr(ds_mod, "crop_resize", spy)
    ds = ImageFolderDataset(tmp_path, size=128, train=True, crop_min=0.5)
    torch.manual_seed(0)
    for _ in range(20):
        ds[0]
    assert all(side >= size for _, side, size in seen)  # the crop is never upscaled
    assert any(short < 1536 for short, _, _ in seen)  # but the decode was reduced


def test_small_image_is_upscaled(tmp_path):
    root = tmp_path / "small"
    root.mkdir()
    _gradient(30, 20).save(root / "tiny.png")
    s = ImageFolderDataset(root, size=64, train=False)[0]
    assert s["image"].shape == (3, 64, 64)
    img = _rgb255(s)
    # Centre 20×20 crop of a 30-px-wide gradient: R spans x = 5..24 of 0..29, smoothly, not blocky.
    assert img[:, 0, 0].mean() == pytest.approx(5 * 255 / 29, abs=8)
    assert img[:, -1, 0].mean() == pytest.approx(24 * 255 / 29, abs=8)
    assert len(np.unique(img[32, :, 0].round())) > 30


# --- robust decoding --------------------------------------------------------------------------------


def _hostile(tmp_path):
    files = {}
    good = tmp_path / "src.jpg"
    _gradient(200, 150).save(good, quality=90)
    data = good.read_bytes()
    files["truncated.jpg"] = data[: len(data) // 2]
    png = tmp_path / "src.png"
    _gradient(200, 150).save(png)
    data = png.read_bytes()
    files["truncated.png"] = data[: len(data) // 2]
    files["empty.jpg"] = b""
    files["text.jpg"] = b"this is not a jpeg\n" * 10
    return files


def test_hostile_files_raise_unusable(tmp_path):
    for name, data in _hostile(tmp_path).items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UnusableImageError):
            load_image(tmp_path / name)
    with pytest.raises(UnusableImageError):
        load_image(tmp_path / "missing.jpg")


def test_hostile_files_are_skipped_and_counted(tmp_path, caplog):
    root = tmp_path / "mixed"
    root.mkdir()
    for name, data in _hostile(tmp_path).items():
        (root / f"a_{name}").write_bytes(data)
    _solid(root / "z_good.png")
    ds = ImageFolderDataset(root, size=16, train=False)
    assert len(ds) == 5
    with caplog.at_level(logging.WARNING, logger="ldm_asym.data.datasets"):
        s = ds[0]
    assert s["n_skipped"] == 4 and ds.skipped == 4
    assert np.allclose(_rgb255(s).mean((0, 1)), (200, 50, 30), atol=3)
    logged = caplog.text
    for name in ("a_truncated.jpg", "a_truncated.png", "a_empty.jpg", "a_text.jpg"):
        assert name in logged
    assert ds[4]["n_skipped"] == 0
    assert ds[2]["n_skipped"] == 2 and ds.skipped == 6  # a_text.jpg, a_truncated.jpg


def test_skip_warnings_are_rate_limited(tmp_path, caplog):
    root = tmp_path / "many"
    root.mkdir()
    for i in range(30):
        (root / f"bad{i:02d}.jpg").write_bytes(b"")
    _solid(root / "good.png")
    ds = ImageFolderDataset(root, size=16, train=False)
    with caplog.at_level(logging.WARNING, logger="ldm_asym.data.datasets"):
        for i in range(30):
            ds[i]
    # 30 + 29 + ... + 1 skips = 465: the first 10 logged, then the 100th, 200th, 300th, 400th.
    assert ds.skipped == 465
    assert len(caplog.records) == 14


def test_all_bad_folder_raises(tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    for i in range(3):
        (small / f"b{i}.jpg").write_text("nope")
    with pytest.raises(RuntimeError, match="3 consecutive"):
        ImageFolderDataset(small, size=16)[1]
    big = tmp_path / "big"
    big.mkdir()
    for i in range(60):
        (big / f"b{i:02d}.png").write_bytes(b"")
    ds = ImageFolderDataset(big, size=16)
    with pytest.raises(RuntimeError, match="50 consecutive"):
        ds[0]
    assert ds.skipped == 50


def test_decompression_bombs_are_skipped(tmp_path, monkeypatch):
    root = tmp_path / "bombs"
    root.mkdir()
    _solid(root / "a_warn.png", size=(48, 48))  # 2304 px: between the limit and twice it (Pillow warns)
    _solid(root / "b_error.png", size=(100, 100))  # 10000 px: over twice the limit (Pillow raises)
    _solid(root / "c_ok.png", size=(32, 32))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)
    for name in ("a_warn.png", "b_error.png"):
        with pytest.raises(UnusableImageError, match="DecompressionBomb"):
            load_image(root / name)
    ds = ImageFolderDataset(root, size=16, train=False)
    assert ds[0]["n_skipped"] == 2 and ds[2]["n_skipped"] == 0


def test_grayscale_and_palette(tmp_path):
    Image.new("L", (20, 20), 100).save(tmp_path / "gray.png")
    assert load_image(tmp_path / "gray.png").mode == "RGB"
    assert np.asarray(load_image(tmp_path / "gray.png"))[5, 5].tolist() == [100, 100, 100]
    pal = Image.new("P", (20, 20), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.save(tmp_path / "pal.png")
    assert np.asarray(load_image(tmp_path / "pal.png"))[5, 5].tolist() == [10, 200, 30]
    Image.new("1", (20, 20), 1).save(tmp_path / "bw.bmp")
    assert np.asarray(load_image(tmp_path / "bw.bmp"))[5, 5].tolist() == [255, 255, 255]


def test_transparency_composited_on_white(tmp_path):
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., 0] = 255  # red everywhere, but ...
    rgba[:, 10:, :3] = (0, 0, 255)
    rgba[:, 10:, 3] = 255  # ... only the blue right half is opaque
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    out = np.asarray(load_image(tmp_path / "rgba.png"))
    assert out[5, 2].tolist() == [255, 255, 255] and out[5, 15].tolist() == [0, 0, 255]
    s = ImageFolderDataset(tmp_path, size=20, train=False)[0]  # only rgba.png is in the folder
    assert torch.all(s["image"][:, :, :8] == 1.0)

    la = Image.new("LA", (20, 20), (0, 0))  # black but fully transparent
    la.save(tmp_path / "la.png")
    assert np.asarray(load_image(tmp_path / "la.png"))[5, 5].tolist() == [255, 255, 255]

    pal = Image.new("P", (20, 20), 0)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.paste(1, (10, 0, 20, 20))
    pal.save(tmp_path / "pal_t.png", transparency=0)
    out = np.asarray(load_image(tmp_path / "pal_t.png"))
    assert out[5, 2].tolist() == [255, 255, 255] and out[5, 15].tolist() == [10, 200, 30]


def test_cmyk_jpeg(tmp_path):
    Image.new("RGB", (32, 32), (200, 50, 30)).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    with Image.open(tmp_path / "cmyk.jpg") as im:
        assert im.mode == "CMYK"
    out = np.asarray(load_image(tmp_path / "cmyk.jpg")).astype(int)
    assert np.abs(out[16, 16] - (200, 50, 30)).max() <= 6


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.linspace(0, 65535, 64).round().astype(np.uint16)[None].repeat(8, 0)
    Image.fromarray(values).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as im:
        assert im.mode.startswith("I")
    out = np.asarray(load_image(tmp_path / "deep.png"))
    assert out.shape == (8, 64, 3)
    expected = np.linspace(0, 255, 64)
    assert np.abs(out[0, :, 0] - expected).max() <= 1  # clipping would make most of the row 255
    assert (out[..., 0] == out[..., 2]).all()


def test_exif_orientation_applied(tmp_path):
    # Stored 64 wide × 32 tall, top half red; orientation 6 = rotate 90° clockwise for display,
    # so the upright image is 32 wide × 64 tall with the red half on the right.
    stored = np.zeros((32, 64, 3), np.uint8)
    stored[:16] = (255, 0, 0)
    stored[16:] = (0, 0, 255)
    im = Image.fromarray(stored)
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    out = np.asarray(load_image(tmp_path / "rotated.jpg")).astype(int)
    assert out.shape == (64, 32, 3)
    assert out[32, 28, 0] > 200 and out[32, 28, 2] < 50  # right: red
    assert out[32, 3, 2] > 200 and out[32, 3, 0] < 50  # left: blue
    # The dataset's centre crop of the upright image: 32×32 from the middle, red on the right.
    img = _rgb255(ImageFolderDataset(tmp_path, size=32, train=False)[0])
    assert img[16, 28, 0] > 200 and img[16, 3, 2] > 200


# --- folders, caches, lists ---------------------------------------------------------------------------


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolderDataset(tmp_path / "nowhere")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="empty"):
        ImageFolderDataset(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"ImageNet train folder not found: .*imagenet.train"):
        ImageNetDataset(tmp_path / "imagenet", split="train")
    with pytest.raises(ValueError, match="split"):
        ImageNetDataset(tmp_path, split="test")
    with pytest.raises(ValueError, match="crop_min"):
        ImageFolderDataset(_folder(tmp_path), crop_min=0)


def test_recursive_sorted_listing(tmp_path):
    root = tmp_path / "tree"
    (root / "b").mkdir(parents=True)
    (root / "a" / "deep").mkdir(parents=True)
    (root / ".hidden").mkdir()
    for rel, fmt in (("b/2.JPG", "JPEG"), ("a/deep/1.png", "PNG"), ("a/0.webp", "WEBP"), ("c.bmp", "BMP")):
        _solid(root / rel, format=fmt)
    for rel in (".hidden/x.png", "b/._resource.jpg", "notes.txt"):  # hidden or not an image extension
        _solid(root / rel, format="PNG")
    ds = ImageFolderDataset(root, size=16)
    listed = [os.path.relpath(ds.path(i), root) for i in range(len(ds))]
    assert listed == ["a/0.webp", "a/deep/1.png", "b/2.JPG", "c.bmp"]
    assert [ds[i]["n_skipped"] for i in range(len(ds))] == [0, 0, 0, 0]
    only_png = ImageFolderDataset(root, size=16, extensions=("PNG",), refresh_cache=True)
    assert len(only_png) == 1


def test_file_list_cache_written_reused_and_refreshed(tmp_path, monkeypatch):
    root = tmp_path / "cached"
    (root / "cls1").mkdir(parents=True)
    for i in range(3):
        _solid(root / "cls1" / f"{i}.png")
    scans = []
    real_scan = ds_mod._scan
    monkeypatch.setattr(ds_mod, "_scan", lambda *a: scans.append(1) or real_scan(*a))

    assert len(ImageFolderDataset(root, size=16)) == 3
    cache = root / CACHE_NAME
    assert cache.is_file() and "cls1/0.png" in cache.read_text()
    assert len(ImageFolderDataset(root, size=16)) == 3
    assert len(scans) == 1  # the second start reused the cache (writing it did not invalidate it)

    time.sleep(0.05)  # file mtimes tick with the kernel's coarse clock
    _solid(root / "cls1" / "3.png")  # a change one level down
    assert len(ImageFolderDataset(root, size=16)) == 4 and len(scans) == 2
    time.sleep(0.05)
    (root / "cls2").mkdir()  # a change in root itself
    _solid(root / "cls2" / "0.png")
    assert len(ImageFolderDataset(root, size=16)) == 5 and len(scans) == 3
    assert len(ImageFolderDataset(root, size=16)) == 5 and len(scans) == 3
    assert len(ImageFolderDataset(root, size=16, refresh_cache=True)) == 5 and len(scans) == 4

    explicit = tmp_path / "lists" / "mine.txt"
    assert len(ImageFolderDataset(root, size=16, cache_file=explicit)) == 5
    assert explicit.is_file() and len(scans) == 5


def _list_at_once(root, marks, barrier):
    """One rank of a job: scans (leaving a mark) only if no other rank's cache is there."""
    real = ds_mod._scan

    def slow_scan(*args):
        (Path(marks) / str(os.getpid())).write_text("")
        time.sleep(0.5)  # a slow shared file system: the others arrive while this one scans
        return real(*args)

    ds_mod._scan = slow_scan
    barrier.wait()
    sys.exit(0 if len(ds_mod.list_images(root)) == 3 else 1)


def test_ranks_starting_together_scan_once(tmp_path):
    import multiprocessing

    root, marks = _folder(tmp_path, n=3), tmp_path / "marks"
    marks.mkdir()
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_list_at_once, args=(str(root), str(marks), barrier)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 4
    assert len(list(marks.iterdir())) == 1  # one rank scanned, three waited and read its cache
    assert not list(root.glob("*.tmp"))


def test_file_list_cache_falls_back_to_home_cache(tmp_path, monkeypatch):
    root = _folder(tmp_path, n=2)
    (root / CACHE_NAME).mkdir()  # makes the in-folder cache unwritable, even for root users
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert len(ImageFolderDataset(root, size=16)) == 2
    written = list((tmp_path / "xdg" / "ldm_asym").glob("filelist-*.txt"))
    assert len(written) == 1 and "img0.png" in written[0].read_text()
    monkeypatch.setattr(ds_mod, "_scan", lambda *a: pytest.fail("rescanned despite a valid cache"))
    assert len(ImageFolderDataset(root, size=16)) == 2


def test_imagenet_layout(tmp_path):
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("n01440764", "n01443537"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                _solid(tmp_path / split / cls / f"{cls}_{i}.JPEG", format="JPEG")
    train = ImageNetDataset(tmp_path, split="train", size=16)
    val = ImageNetDataset(tmp_path, split="val", size=16)
    assert len(train) == 6 and len(val) == 4
    assert train.train and not val.train
    assert os.path.relpath(val.path(0), tmp_path) == "val/n01440764/n01440764_0.JPEG"
    assert torch.equal(val[3]["mask"], val[3]["mask"])


def test_file_list_dataset(tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    _solid(data / "sub" / "a.png", color=(255, 0, 0))
    _solid(data / "b.png", color=(0, 255, 0))
    absolute = _solid(tmp_path / "c.png", color=(0, 0, 255))
    listing = data / "list.txt"
    listing.write_text(f"# training images\n\nsub/a.png\n  b.png  \n# gone.png\nmissing.png\n{absolute}\n")
    ds = FileListDataset(listing, size=16, train=False)
    assert len(ds) == 4
    colors = [tuple(np.round(_rgb255(ds[i]).mean((0, 1)) / 255).astype(int)) for i in (0, 1, 3)]
    assert colors == [(1, 0, 0), (0, 1, 0), (0, 0, 1)]
    s = ds[2]  # missing.png: skipped, counted, next entry used
    assert s["n_skipped"] == 1 and ds.skipped == 1
    assert tuple(np.round(_rgb255(s).mean((0, 1)) / 255).astype(int)) == (0, 0, 1)

    (tmp_path / "elsewhere.txt").write_text("sub/a.png\n")
    other = FileListDataset(tmp_path / "elsewhere.txt", root=data, size=16)
    assert other.path(0) == str(data / "sub" / "a.png") and other[0]["n_skipped"] == 0

    (tmp_path / "blank.txt").write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="blank.txt"):
        FileListDataset(tmp_path / "blank.txt")
    with pytest.raises(FileNotFoundError, match="nolist.txt"):
        FileListDataset(tmp_path / "nolist.txt")


# --- scikit-image demo data ------------------------------------------------------------------------


def test_skimage_dataset():
    train = SkimageDataset("train", size=32, n_crops=10)
    val = SkimageDataset("val", size=32)
    assert not set(train.photo_names) & set(val.photo_names)
    assert "cat" not in train.photo_names  # skimage's cat is chelsea, a val photo
    assert len(train) == 10 and len(val) == 64 and len(SkimageDataset(size=32)) == 2000
    assert len(train.photos) == len(SkimageDataset.TRAIN_PHOTOS) and len(val.photos) == 2
    assert all(p.mode == "RGB" for p in train.photos + val.photos)
    s = train[0]
    assert s["image"].shape == (3, 32, 32) and s["mask"].shape == (1, 32, 32) and s["n_skipped"] == 0
    assert -1 <= s["image"].min() < s["image"].max() <= 1
    torch.manual_seed(0)
    a = val[5]
    torch.manual_seed(1)
    b = val[5]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert not torch.equal(val[5]["image"], val[6]["image"])
    assert torch.equal(val[(5, 99)]["image"], a["image"]) and torch.equal(val[(5, 99)]["mask"], a["mask"])
    torch.manual_seed(2)
    c = train[(3, 11)]
    torch.manual_seed(3)
    d = train[(3, 11)]
    assert torch.equal(c["image"], d["image"]) and torch.equal(c["mask"], d["mask"])
    assert not torch.equal(train[(3, 12)]["image"], c["image"])
    with pytest.raises(IndexError):
        train[10]
    with pytest.raises(ValueError, match="split"):
        SkimageDataset("test")
