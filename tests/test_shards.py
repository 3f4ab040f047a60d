"""Shards: scripts/make_shards.py converts, resumes after an interruption, keeps small files' bytes,
lists what it skipped; ShardDataset yields the folder dataset's samples and skips bad items.
(Training from shards on 2 ranks, with an exact mid-epoch resume: tests/test_distributed.py.)"""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_asym.data import ImageFolderDataset, ShardDataset, list_images
from ldm_asym.data import shard_writer as W

REPO = Path(__file__).resolve().parents[1]


def _images(folder: Path, n: int = 12, big_every: int = 4) -> Path:
    """n small JPEGs in two subfolders (every `big_every`-th one 300 px on its short side) and one
    corrupt file."""
    rng = np.random.default_rng(0)
    for i in range(n):
        side = 300 if i % big_every == 0 else int(rng.integers(70, 120))
        sub = folder / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (side, side + 10, 3), dtype=np.uint8)).save(sub / f"{i:03d}.jpg", quality=90)
    (folder / "a" / "zz_broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return folder


def _convert(src: Path, out: Path, **kw):
    keys = list_images(src, cache_file=out.parent / f"{out.name}.filelist")
    return W.write_shards([str(src / k) for k in keys], keys, str(out), str(src),
                          W.Settings(max_side=128, part_size=4, **kw))


def _stored(out: Path) -> dict[str, bytes]:
    ds = ShardDataset(out)
    return {ds._stream[i]["key"]: bytes(ds._stream[i]["image"]) for i in range(len(ds))}


def test_converter_keeps_small_files_resizes_large_and_lists_skipped(tmp_path):
    src = _images(tmp_path / "imgs")
    out = subprocess.run([sys.executable, "scripts/make_shards.py", "--input", str(src), "--out", str(tmp_path / "s"),
                          "--max-side", "128", "--part-size", "4"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert (m["inputs"], m["written"], m["parts"]) == (13, 12, 4)
    assert [s["key"] for s in m["skipped"]] == ["a/zz_broken.jpg"] and m["skipped"][0]["reason"]
    stored = _stored(tmp_path / "s")
    assert sorted(stored) == sorted(p.relative_to(src).as_posix() for p in src.rglob("0*.jpg"))
    for key, data in stored.items():
        original = (src / key).read_bytes()
        im = Image.open(io.BytesIO(data))
        if min(Image.open(src / key).size) <= 128:
            assert data == original, key  # kept as it was: no second JPEG loss
        else:
            assert min(im.size) == 128 and im.format == "JPEG", key
    assert m["kept_original_bytes"] == 9


def test_interrupted_conversion_resumes_part_by_part(tmp_path, monkeypatch):
    src = _images(tmp_path / "imgs")
    _convert(src, tmp_path / "straight")
    real, calls = W._write_part, []

    def dies_in_part_2(out_dir, part, *a):
        calls.append(part)
        if part == 2:
            open(os.path.join(out_dir, f"chunk-{part}-0.bin"), "wb").write(b"half a chunk")  # the crash's leftovers
            raise KeyboardInterrupt
        return real(out_dir, part, *a)

    monkeypatch.setattr(W, "_write_part", dies_in_part_2)
    with pytest.raises(KeyboardInterrupt):
        _convert(src, tmp_path / "cut")
    assert not (tmp_path / "cut" / "index.json").exists()  # nothing trainable yet
    with pytest.raises(FileNotFoundError, match="run it again to finish"):
        ShardDataset(tmp_path / "cut")
    monkeypatch.setattr(W, "_write_part", lambda *a: calls.append(a[1]) or real(*a))
    calls.clear()
    m = _convert(src, tmp_path / "cut")
    assert calls == [2, 3]  # parts 0 and 1 were kept
    assert _stored(tmp_path / "cut") == _stored(tmp_path / "straight")
    a, b = ShardDataset(tmp_path / "cut"), ShardDataset(tmp_path / "straight")
    assert [a._stream[i]["key"] for i in range(len(a))] == [b._stream[i]["key"] for i in range(len(b))]
    assert m["written"] == 12 and _convert(src, tmp_path / "cut") == m  # a finished conversion is left alone


def test_resume_with_other_settings_is_refused(tmp_path, monkeypatch):
    src = _images(tmp_path / "imgs")
    monkeypatch.setattr(W, "_merge", lambda out: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        _convert(src, tmp_path / "s")
    with pytest.raises(ValueError, match="other settings.*plan.json"):
        _convert(src, tmp_path / "s", quality=80)


def test_shard_samples_equal_the_folder_datasets(tmp_path):
    """Same images (kept bytes), same (index, seed) -> the same crop, mask and index."""
    src = _images(tmp_path / "imgs", big_every=1000)  # all small: every file kept byte for byte
    (src / "a" / "zz_broken.jpg").unlink()
    _convert(src, tmp_path / "s")
    shards = ShardDataset(tmp_path / "s", size=64, masks={"preset": "train", "p_full": 0.5})
    folder = ImageFolderDataset(src, size=64, masks={"preset": "train", "p_full": 0.5},
                                cache_file=tmp_path / "list.txt")
    assert len(shards) == len(folder) == 12
    for key in [(0, 11), (5, 123), (11, 7)]:
        a, b = shards[key], folder[key]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"]) and a["index"] == b["index"]


def test_bad_items_are_skipped_and_counted(tmp_path):
    from litdata.streaming.writer import BinaryWriter

    good = io.BytesIO()
    Image.new("RGB", (80, 80), (10, 200, 30)).save(good, "PNG")
    with W._writer_rank(0):
        w = BinaryWriter(str(tmp_path / "s"), chunk_bytes="1MB")
        for i, data in enumerate([good.getvalue(), b"garbage", b"", good.getvalue()]):
            w.add_item(i, {"image": data, "key": f"k{i}"})
        w.done()
    W._merge(str(tmp_path / "s"))
    ds = ShardDataset(tmp_path / "s", size=64)
    assert ds[1]["n_skipped"] == 2 and ds.skipped == 2 and ds[1]["index"] == 1
    assert ds[3]["n_skipped"] == 0


def test_missing_shards_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"folder not found.*make_shards.py"):
        ShardDataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no index.json"):
        ShardDataset(tmp_path / "empty")
