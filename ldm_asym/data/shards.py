"""Training images streamed from shards (litdata), on a local path or an object store.

Why litdata: it is Lightning's own streaming format (chunked binary files plus one index.json),
reads local folders in place and s3:// / gs:// / azure:// URLs through a local chunk cache, and
gives **random access by global index** (`dataset[i]` loads the chunk holding `i`). That last
point lets the shards plug into our ResumableSampler unchanged, so everything the folder datasets
guarantee holds here by the same code: the order is a pure function of (seed, epoch), rank r takes
elements r, r + world, ... of it (disjoint across ranks), a mid-epoch resume skips exactly the
consumed prefix, and crops and masks come from the per-sample seed. webdataset has no random
access (resume = replaying a stream), and MosaicML streaming pins numpy < 2.2 and transformers < 5.

The cost of random access on remote data: each node's cache ends up holding every chunk it was
asked for, so give `cache_dir` a local disk that holds the dataset (ImageNet at 512 px short side is
~60 GB), or `max_cache_size` and accept re-downloads. Local and parallel-filesystem paths are read
in place. Shards are written by scripts/make_shards.py: one item = {"image": encoded bytes, "key": name}.
"""

from __future__ import annotations

import io
import json
import os

from PIL import Image

from ldm_asym.data.datasets import UnusableImageError, _SkippingDataset, load_image

INDEX = "index.json"  # litdata's index of chunks
MANIFEST = "manifest.json"  # ours: counts, skipped inputs, settings (scripts/make_shards.py)
REMOTE = ("s3://", "gs://", "azure://", "hf://", "r2://")


def is_remote(path: str) -> bool:
    return str(path).startswith(REMOTE)


class ShardDataset(_SkippingDataset):
    """Images from litdata shards at `input_dir` (a folder or an object-store URL), with the paper's
    crops and our seeded masks; `train=False` gives the fixed center crops and index-seeded masks.

    `cache_dir` / `max_cache_size` / `storage_options` go to litdata for remote shards (chunks are
    downloaded there once per node). An item that does not decode is skipped and counted.
    """

    def __init__(self, input_dir: str | os.PathLike, size: int = 256, train: bool = True, crop_min: float = 0.5,
                 flip: bool = False, masks: dict | None = None, cache_dir: str | None = None,
                 max_cache_size: str | None = None, storage_options: dict | None = None):
        super().__init__(size, train, crop_min, flip, masks)
        input_dir = str(input_dir)
        if not is_remote(input_dir):
            input_dir = os.path.abspath(input_dir)
            if not os.path.isfile(os.path.join(input_dir, INDEX)):
                what = "folder not found" if not os.path.isdir(input_dir) else f"no {INDEX} in the folder"
                raise FileNotFoundError(
                    f"shard dataset {input_dir}: {what}. Write shards with "
                    f"`python scripts/make_shards.py --input <images> --out {input_dir}` (an interrupted "
                    f"conversion writes {INDEX} only when it completes: run it again to finish)")
        from litdata import StreamingDataset

        self.root, self.skipped = input_dir, 0
        self._stream = StreamingDataset(input_dir, cache_dir=cache_dir, max_cache_size=max_cache_size,
                                        storage_options=storage_options or {})
        # Not len(stream): under DDP litdata reports the per-rank share; we shard in the sampler.
        self._length = sum(end - start for start, end in self._stream.region_of_interest)
        if self._length == 0:
            raise ValueError(f"shard dataset {input_dir} holds no images")

    def __len__(self) -> int:
        return self._length

    def _name(self, idx: int) -> str:
        return f"{self.root}[{idx}]"

    def _decode(self, idx: int, min_side: int) -> Image.Image:
        try:
            item = self._stream[idx]
        except (OSError, ValueError, KeyError, RuntimeError) as e:  # a damaged chunk or a failed download
            raise UnusableImageError(f"cannot read item {idx}: {type(e).__name__}: {e}") from e
        if not isinstance(item, dict) or "image" not in item:
            raise UnusableImageError(f"item {idx} has no 'image' field (not written by scripts/make_shards.py?)")
        return load_image(io.BytesIO(item["image"]), min_side)


def read_manifest(out_dir: str | os.PathLike) -> dict | None:
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)
