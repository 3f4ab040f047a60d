"""Issue #11: hostile files and tensors give no crash, no silent wrong result and no misleading message.

Classes covered here: data folders (symlink loops, unresolvable links, odd names, a dataset smaller
than a batch), the scripts (make_masks.py, inpaint.py, evaluate.py: unreadable inputs, odd names,
atomic outputs) and decode()'s input checks. The hostile inputs come from tests/corpus_inputs.py.
"""

import csv
import importlib.util
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import corpus_inputs as C
from conftest import TINY_VAE
from ldm_asym.data.datasets import ImageFolderDataset, list_images
from ldm_asym.util import atomic_write

ROOT = Path(__file__).resolve().parents[1]
DATA_LOG = "ldm_asym.data.datasets"
pytestmark = pytest.mark.usefixtures("one_thread")


def script(name):
    spec = importlib.util.spec_from_file_location(f"{name}_script_hostile", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def visible(folder: Path) -> list[str]:
    """Names in `folder` that a user (or a rerun) would see: no hidden temporary files."""
    return sorted(os.fsdecode(n) for n in os.listdir(os.fsencode(folder)) if not n.startswith(b"."))


def leftovers(folder: Path) -> list[str]:
    return [n for n in os.listdir(folder) if n.endswith(".tmp")]


def folder_with_goods(tmp_path, n=2, name="imgs") -> Path:
    root = tmp_path / name
    root.mkdir()
    for i in range(n):
        C.good(root, f"img{i}.png")
    return root


# ====================================================================== data folders
def _loop_dot(root):
    C.symlink_loop(root)
    return 2


def _loop_in_subfolder(root):
    sub = root / "sub"
    sub.mkdir()
    C.good(sub, "deep.png")
    C.symlink_loop(sub, "again")  # sub/again -> sub
    (sub / "up").symlink_to("..", target_is_directory=True)  # sub/up -> root
    return 3


def _cycle_two_folders(root):
    C.symlink_cycle(root)  # a -> b, b/back -> root
    return 3


def _two_links_same_folder(root):
    shared = root / "shared"
    shared.mkdir()
    C.good(shared, "s.png")
    (root / "link1").symlink_to("shared", target_is_directory=True)
    (root / "link2").symlink_to("shared", target_is_directory=True)
    (root / "a_link").symlink_to("shared", target_is_directory=True)  # sorts before the real folder
    return 3


@pytest.mark.parametrize("make", [_loop_dot, _loop_in_subfolder, _cycle_two_folders, _two_links_same_folder],
                         ids=["ln_s_dot_loop", "loops_in_subfolder", "cycle_through_two_folders",
                              "two_links_one_folder"])
def test_symlinked_folders_are_visited_once(tmp_path, caplog, make):
    root = folder_with_goods(tmp_path)
    expected = make(root)
    with caplog.at_level(logging.WARNING, DATA_LOG):
        files = list_images(root, cache_file=tmp_path / "cache.txt")
    assert len(files) == expected, files  # os.walk(followlinks=True) listed the loop's images 40 times over
    real = {os.path.realpath(root / f) for f in files}
    assert len(real) == len(files)  # no image twice
    if make is _two_links_same_folder:
        assert "shared/s.png" in files  # listed under the real folder's path, not a link's
    if make is _cycle_two_folders:
        assert "b/in_b.png" in files
    assert "folder already visited" in caplog.text and f"kept {expected} images" in caplog.text
    assert len(ImageFolderDataset(root, size=16, cache_file=tmp_path / "cache.txt")) == expected  # cached too


@pytest.mark.parametrize("where", ["root", "subfolder", "image_name"])
def test_self_symlink_is_dropped_not_fatal(tmp_path, caplog, where):
    root = folder_with_goods(tmp_path)
    if where == "root":
        link = C.self_symlink(root)  # `ln -s self self` beside the images
    elif where == "subfolder":
        (root / "sub").mkdir()
        link = C.self_symlink(root / "sub")
    else:
        link = C.self_symlink(root, "self.png")
    with caplog.at_level(logging.WARNING, DATA_LOG):
        ds = ImageFolderDataset(root, size=16, train=False)
    assert len(ds) == 2 and ds[0]["n_skipped"] == 0 and ds[1]["n_skipped"] == 0
    assert "unresolvable symlink" in caplog.text and str(link) in caplog.text


def test_newline_name_is_dropped_counted_and_logged(tmp_path, caplog):
    root = folder_with_goods(tmp_path)
    C.newline_name(root)
    C.newline_name(root, "two\nlines\nhere")
    with caplog.at_level(logging.WARNING, DATA_LOG):
        files = list_images(root)
    assert files == ["img0.png", "img1.png"]
    assert caplog.text.count("newline in the file name") == 3  # two entries, and the summary
    assert "dropped 2 entries: 2 x newline in the file name" in caplog.text
    assert list_images(root) == files  # the cache still has one name per line


def test_broken_symlink_and_fifo_are_dropped(tmp_path, caplog):
    root = folder_with_goods(tmp_path)
    C.broken_symlink(root)
    C.fifo(root)  # a dataset reading it would block forever
    with caplog.at_level(logging.WARNING, DATA_LOG):
        files = list_images(root)
    assert files == ["img0.png", "img1.png"]
    assert "dropped 2 entries: 2 x broken symlink or not a regular file" in caplog.text
    assert "gone.png" in caplog.text and "pipe.png" in caplog.text


def test_summary_counts_every_reason(tmp_path, caplog):
    root = folder_with_goods(tmp_path)
    C.symlink_loop(root)
    C.self_symlink(root)
    C.newline_name(root)
    C.broken_symlink(root)
    with caplog.at_level(logging.WARNING, DATA_LOG):
        assert len(list_images(root)) == 2
    summary = [r.getMessage() for r in caplog.records if "file scan of" in r.getMessage()]
    assert len(summary) == 1 and "dropped 4 entries" in summary[0]
    for reason in ("folder already visited", "unresolvable symlink", "newline", "broken symlink"):
        assert f"1 x {reason}" in summary[0]


def test_non_utf8_name_is_listed_cached_and_loaded(tmp_path):
    root = folder_with_goods(tmp_path, n=1)
    bad = C.non_utf8_name(root)
    ds = ImageFolderDataset(root, size=16, train=False)
    assert len(ds) == 2 and ds.path(0) == str(bad) and ds[0]["n_skipped"] == 0
    again = ImageFolderDataset(root, size=16, train=False)  # read back from the cache
    assert again.path(0) == str(bad)


# ---------------------------------------------------------------------- smaller than a batch
def _datamodule(root, batch_size, **kw):
    from ldm_asym.train.data import DataModule

    train = {"target": "ldm_asym.data.ImageFolderDataset", "params": {"root": str(root), "size": 16}}
    return DataModule(train=train, batch_size=batch_size, num_workers=0, **kw)


@pytest.mark.parametrize("n_images,batch,world", [(3, 4, 1), (1, 2, 1), (5, 4, 2), (7, 4, 2)],
                         ids=["3_images_batch_4", "1_image_batch_2", "5_images_batch_4_two_ranks",
                              "7_images_batch_4_two_ranks"])
def test_dataset_smaller_than_a_batch_is_an_error(tmp_path, monkeypatch, n_images, batch, world):
    from ldm_asym.train import data as data_mod

    root = folder_with_goods(tmp_path, n_images)
    monkeypatch.setattr(data_mod, "_world_size", lambda: world)
    dm = _datamodule(root, batch)
    with pytest.raises(ValueError) as e:
        dm.setup("fit")
    msg = str(e.value)
    assert str(root) in msg and f"{n_images} samples" in msg and f"one batch of {batch}" in msg
    assert "0 steps" in msg and "batch_size" in msg
    if world > 1:
        assert f"{world} processes" in msg


def test_world_size_known_only_at_the_dataloader(tmp_path, monkeypatch):
    """build() ran with one process (before DDP started); train_dataloader() sees two ranks."""
    from ldm_asym.train import data as data_mod

    root = folder_with_goods(tmp_path, 5)
    dm = _datamodule(root, 4)
    dm.setup("fit")  # 5 >= 4 on one process
    monkeypatch.setattr(data_mod, "_world_size", lambda: 2)
    with pytest.raises(ValueError, match=r"5 samples.*one batch of 4 per process \(2 processes: 2 each\)"):
        dm.train_dataloader()


def test_exactly_one_batch_trains(tmp_path):
    dm = _datamodule(folder_with_goods(tmp_path, 4), 4)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 16, 16)


# ====================================================================== make_masks.py
@pytest.mark.parametrize("kind", ["zero_byte", "text_as_png", "bomb", "bomb_warn"])
def test_make_masks_skips_unreadable_and_reruns(tmp_path, monkeypatch, capsys, kind):
    C.bomb_limit(monkeypatch)
    folder = tmp_path / "imgs"
    folder.mkdir()
    C.good(folder, "a.png")
    bad = C.UNREADABLE[kind](folder)
    C.good(folder, "z.png")
    main = script("make_masks").main
    assert main(["--images", str(folder), "--preset", "thin"]) == 0
    err = capsys.readouterr().err
    assert bad.name in err and "skipping unreadable image" in err
    masks = [n for n in visible(folder) if "_mask" in n]
    assert masks == ["a_mask.png", "z_mask.png"]  # both good images, whatever order the bad one has
    assert main(["--images", str(folder), "--preset", "thin"]) == 0  # a rerun needs no --overwrite
    assert "2 identical files kept" in capsys.readouterr().out


def test_make_masks_1x1_image_names_the_image_and_the_flag(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    C.good(folder, "a.png")
    tiny = C.one_by_one(folder)
    main = script("make_masks").main
    assert main(["--images", str(folder)]) == 1
    err = capsys.readouterr().err
    assert str(tiny) in err and "1x1" in err and "--size" in err
    assert visible(folder) == ["a.png", "tiny.png"]  # nothing written for the earlier image either
    assert main(["--images", str(folder), "--size", "32"]) == 0
    assert Image.open(folder / "tiny_mask.png").size == (32, 32)
    assert main(["--images", str(folder), "--size", "8", "--overwrite"]) == 1
    assert "--size must be >= 16" in capsys.readouterr().err


def _disk_full_at_second_save(monkeypatch) -> None:
    """Image.save writes half of the second file it is given, then fails as a full disk does."""
    real, calls = Image.Image.save, []

    def failing(self, fp, *a, **kw):
        calls.append(fp)
        if len(calls) == 2:
            with open(fp, "wb") if isinstance(fp, (str, Path)) else open(os.dup(fp.fileno()), "wb") as f:
                f.write(b"\x89PNG half a file")
            raise OSError(28, "No space left on device")
        return real(self, fp, *a, **kw)

    monkeypatch.setattr(Image.Image, "save", failing)


def test_make_masks_crash_leaves_nothing_that_blocks_a_rerun(tmp_path, monkeypatch, capsys):
    folder = folder_with_goods(tmp_path, 3)
    mod = script("make_masks")
    _disk_full_at_second_save(monkeypatch)
    assert mod.main(["--images", str(folder)]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "img1_mask.png" in err  # names the file
    assert [n for n in visible(folder) if "_mask" in n] == ["img0_mask.png"]  # no half-written img1_mask.png
    assert leftovers(folder) == []
    monkeypatch.undo()  # the disk has room again
    assert mod.main(["--images", str(folder)]) == 0  # img0_mask.png is identical: no --overwrite needed
    assert [n for n in visible(folder) if "_mask" in n] == [f"img{i}_mask.png" for i in range(3)]


def test_make_masks_still_protects_different_masks(tmp_path, capsys):
    folder = folder_with_goods(tmp_path, 2)
    Image.new("L", (40, 32), 255).save(folder / "img0_mask.png")  # hand-drawn
    main = script("make_masks").main
    assert main(["--images", str(folder)]) == 1
    assert "img0_mask.png" in capsys.readouterr().err
    assert not (folder / "img1_mask.png").exists()
    assert np.asarray(Image.open(folder / "img0_mask.png")).min() == 255


# ====================================================================== inpaint.py
INPAINT_BAD_IMAGES = {
    **C.UNREADABLE,
    "header_only_png": C.header_only_png,
    "directory": lambda folder: (folder / "dir.png").mkdir() or folder / "dir.png",
    "missing": lambda folder: folder / "missing.png",
}


@pytest.mark.parametrize("kind", sorted(INPAINT_BAD_IMAGES))
def test_inpaint_bad_image_is_a_clear_error(tmp_path, monkeypatch, capsys, kind):
    C.bomb_limit(monkeypatch)
    bad = INPAINT_BAD_IMAGES[kind](tmp_path)
    mask = C.good(tmp_path, "mask.png")
    # The input is checked before any model is loaded: bogus --pipeline / --ckpt are never reached.
    argv = ["--pipeline", str(tmp_path / "no-pipe"), "--ckpt", str(tmp_path / "no-ckpt"), "--image", str(bad),
            "--mask", str(mask), "--out", str(tmp_path / "out")]
    assert script("inpaint").main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --image ") and str(bad) in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", sorted(INPAINT_BAD_IMAGES))
def test_inpaint_prepare_bad_image_names_the_argument(tmp_path, monkeypatch, kind):
    """The library call the script makes after loading the pipeline (the file may change in between)."""
    from ldm_asym import inpaint

    C.bomb_limit(monkeypatch)
    bad = INPAINT_BAD_IMAGES[kind](tmp_path)
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        inpaint.prepare(bad, C.good(tmp_path, "mask.png"))
    assert str(e.value).startswith(f"--image {bad}")


@pytest.mark.parametrize("kind", ["zero_byte", "truncated_png", "bomb"])
def test_inpaint_bad_mask_is_a_clear_error(tmp_path, monkeypatch, capsys, kind):
    C.bomb_limit(monkeypatch)
    image = C.good(tmp_path, "image.png")
    sub = tmp_path / "m"
    sub.mkdir()
    bad = C.UNREADABLE[kind](sub)
    argv = ["--pipeline", str(tmp_path / "no-pipe"), "--ckpt", str(tmp_path / "no-ckpt"), "--image", str(image),
            "--mask", str(bad), "--out", str(tmp_path / "out")]
    assert script("inpaint").main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --mask") and str(bad) in err


def test_inpaint_outputs_are_atomic(tmp_path, monkeypatch):
    from ldm_asym import inpaint

    image, mask = C.good(tmp_path, "image.png", (24, 16)), tmp_path / "mask.png"
    Image.new("L", (24, 16), 0).save(mask)
    prep = inpaint.prepare(image, mask)
    results = {"vanilla": [prep.original], "asym": [prep.original]}
    out = tmp_path / "out"
    _disk_full_at_second_save(monkeypatch)
    with pytest.raises(OSError, match="image_asym_0.png"):
        inpaint.save_results(out, "image", prep, results)
    assert visible(out) == ["image_vanilla_0.png"] and leftovers(out) == []


# ====================================================================== evaluate.py
@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    from conftest import make_asym, make_vae

    root = tmp_path_factory.mktemp("models")
    vae, asym = make_vae(TINY_VAE, seed=1), make_asym("tiny", seed=2)
    asym.load_state_dict({k: v for k, v in vae.state_dict().items()
                          if k.startswith(("encoder.", "quant_conv.", "post_quant_conv."))}, strict=False)
    vae.save_pretrained(root / "vae")
    asym.save_pretrained(root / "asym")
    return root / "asym", root / "vae"


def test_evaluate_non_utf8_name_writes_every_output(tmp_path, tiny_pair, capsys):
    asym, vae = tiny_pair
    images = folder_with_goods(tmp_path, 1)
    bad = C.non_utf8_name(images)
    out = tmp_path / "out"
    argv = ["--ckpt", str(asym), "--baseline", str(vae), "--images", str(images), "--mask-preset", "thick",
            "--size", "32", "--out", str(out), "--lpips-random", "--quiet"]
    assert script("evaluate").main(argv) == 0
    assert sorted(visible(out)) == ["grids", "per_image.csv", "summary.json", "summary.md"]
    with open(out / "per_image.csv", encoding="utf-8") as f:  # valid UTF-8, every row there
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and {r["image"] for r in rows} == {"caf\\xe9", "img0"}
    assert json.loads((out / "summary.json").read_text(encoding="utf-8"))["config"]["n_images"] == 2
    assert "| ours |" in (out / "summary.md").read_text(encoding="utf-8")
    assert os.fsencode(bad.stem) + b".png" in os.listdir(os.fsencode(out / "grids"))  # the real name
    assert leftovers(out) == []


@pytest.mark.parametrize("kind", ["zero_byte", "text_as_png", "bomb"])
def test_evaluate_unreadable_image_fails_before_any_work(tmp_path, monkeypatch, capsys, kind):
    C.bomb_limit(monkeypatch)
    images = folder_with_goods(tmp_path, 1)
    bad = C.UNREADABLE[kind](images)
    out = tmp_path / "out"
    argv = ["--ckpt", str(tmp_path / "no-model"), "--baseline", str(tmp_path / "no-model"), "--images",
            str(images), "--mask-preset", "thick", "--out", str(out), "--quiet"]
    assert script("evaluate").main(argv) == 1  # about the image, not the (missing) model
    err = capsys.readouterr().err
    assert "cannot read image" in err and str(bad) in err and not out.exists()


def test_evaluate_failure_while_writing_leaves_no_output_that_looks_complete(tmp_path, tiny_pair, monkeypatch,
                                                                               capsys):
    from ldm_asym.eval import inpainting as E

    asym, vae = tiny_pair
    images = folder_with_goods(tmp_path, 2)
    out = tmp_path / "out"

    def broken_markdown(summary):  # fails after the CSV rows and summary.json were rendered
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(E, "markdown", broken_markdown)
    argv = ["--ckpt", str(asym), "--baseline", str(vae), "--images", str(images), "--mask-preset", "thick",
            "--size", "32", "--out", str(out), "--lpips-random", "--quiet", "--max-grids", "0"]
    assert script("evaluate").main(argv) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert visible(out) == [] and leftovers(out) == []  # no summary.json saying "done", no partial CSV


def test_write_csv_non_utf8_name_is_valid_utf8(tmp_path):
    from ldm_asym.eval import inpainting as E

    E.write_csv(tmp_path / "per_image.csv", [{"image": "caf\udce9", "decoder": "ours", "hole_fraction": 0.5}])
    assert "caf\\xe9,ours,0.5" in (tmp_path / "per_image.csv").read_text(encoding="utf-8")


# ---------------------------------------------------------------------- atomic_write itself
def test_atomic_write_keeps_the_old_file_on_error(tmp_path):
    path = tmp_path / "result.csv"
    path.write_text("old complete\n")
    with pytest.raises(RuntimeError):
        with atomic_write(path, "w") as f:
            f.write("new but half")
            raise RuntimeError("crash mid-write")
    assert path.read_text() == "old complete\n" and leftovers(tmp_path) == []
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write("new\n")
    assert path.read_text() == "new\n" and visible(tmp_path) == ["result.csv"]
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # not mkstemp's 0600


def test_atomic_write_error_names_the_file(tmp_path):
    with pytest.raises(OSError, match=r"cannot write .*nowhere.*x\.png"):
        with atomic_write(tmp_path / "nowhere" / "x.png", "wb"):
            pass
    with pytest.raises(ValueError, match="whole files"):
        with atomic_write(tmp_path / "x", "a"):
            pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ====================================================================== decode() input checks
@pytest.fixture(scope="module")
def tiny_model():
    from conftest import perturb_
    from ldm_asym.models.autoencoder import AsymmetricAutoencoder

    torch.manual_seed(0)
    model = AsymmetricAutoencoder(vae_config=dict(TINY_VAE),
                                  decoder=dict(up_widths=[32, 32, 32, 32], resnets_per_level=1, blend="add",
                                               norm_num_groups=8))
    return perturb_(model).eval()


@pytest.mark.parametrize("kind", ["bool_mask", "float64_mask", "uint8_mask", "float64_image", "image_slightly_over"])
@pytest.mark.parametrize("check_inputs", [True, False])
def test_decode_converts_mask_and_image_dtypes(tiny_model, kind, check_inputs):
    z, image, mask = C.decode_inputs(kind)
    ref_z, _, ref_mask = C.decode_inputs("good")
    with torch.no_grad():
        out = tiny_model.decode(z, image=image, mask=mask, check_inputs=check_inputs)
        ref = tiny_model.decode(ref_z, image=image.float(), mask=ref_mask)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 32, 32)
    assert torch.equal(out, ref)  # the same result as the float32 mask / image


@pytest.mark.parametrize("with_image", [True, False])
def test_decode_empty_batch_is_a_clear_error(tiny_model, with_image):
    z, image, mask = C.decode_inputs("empty_batch")
    with pytest.raises(ValueError, match="empty batch"):
        tiny_model.decode(z, image=image if with_image else None, mask=mask if with_image else None)


def test_encode_empty_batch_is_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match="x is an empty batch"):
        tiny_model.encode(torch.zeros(0, 3, 32, 32))


@pytest.mark.parametrize("kind,match", [
    ("image_0_255", r"image values must lie in \[-1, 1\].*x / 127\.5 - 1"),
    ("image_far_below", r"image values must lie in \[-1, 1\]; got min -4"),
    ("image_uint8", r"image must be a float tensor in \[-1, 1\].*uint8.*127\.5 - 1"),
], ids=["image_0_255", "image_far_below", "image_uint8"])
def test_decode_image_out_of_range_is_a_clear_error(tiny_model, kind, match):
    z, image, mask = C.decode_inputs(kind)
    with pytest.raises(ValueError, match=match) as e:
        tiny_model.decode(z, image=image, mask=mask)
    assert "mask" not in str(e.value).split(";")[0]  # it blames the image, not the mask


def test_decode_forward_checks_the_image_range_too(tiny_model):
    z, image, mask = C.decode_inputs("image_0_255")
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        tiny_model(image, mask=mask, sample_posterior=False)
