"""Training / validation datasets: the paper's random square crops plus LaMa masks.

Every dataset returns `{"image": 3×S×S float32 in [-1, 1], "mask": 1×S×S float32 (1 = hole),
"index": int, "n_skipped": int}`. File-backed datasets skip unreadable images (trying the next index) and
report how many were skipped per sample, so the training loop can sum it across workers.

Items are fetched with an index, or with `(index, seed)` as ldm_asym.train.data.ResumableSampler
yields them: training crops and masks then depend on that seed alone (not on which worker or
how far into a resumed run the sample is drawn); without one they use torch's global RNG.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import struct
import warnings
import zlib
from typing import BinaryIO, NamedTuple, Sequence

import numpy as np
import torch
from filelock import FileLock
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from ldm_asym.data.masks import MaskGenerator
from ldm_asym.util import atomic_write

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CACHE_NAME = ".ldm_asym_filelist.txt"
_CACHE_HEADER = "# ldm_asym file list v1 fingerprint="
_LOCK_TIMEOUT_S = 3600  # scanning 1.28M ImageNet files on a slow shared file system takes minutes


class UnusableImageError(Exception):
    """The file cannot be decoded into a sane RGB image; datasets skip it."""


# What Pillow raises for corrupt, truncated, non-image and oversized files.
_DECODE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB of any Pillow mode; transparency is composited on white."""
    if im.mode in _SIXTEEN_BIT:
        # 16-bit PNGs hold 0..65535; Pillow's convert() would clip them at 255 instead of scaling.
        values = np.asarray(im, dtype=np.float64) / 257.0
        im = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
    if im.mode in _ALPHA or "transparency" in im.info:
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im.convert("RGBA"))
    return im.convert("RGB")


def load_image(path: str | os.PathLike | BinaryIO, min_side: int | None = None) -> Image.Image:
    """Decode `path` (a file name or a binary file object) to an upright (EXIF-rotated) 8-bit RGB image, or raise UnusableImageError.

    `min_side` is the smallest short side the caller needs: JPEGs are then decoded at a reduced
    DCT scale (Image.draft), which is several times faster for large photos.
    """
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; both sizes are unusable here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if min_side and im.format in ("JPEG", "MPO") and min(im.size) > min_side:
                    # draft() keeps each side >= the request, so the short side stays >= min_side.
                    r = min_side / min(im.size)
                    im.draft("RGB", (math.ceil(im.width * r), math.ceil(im.height * r)))
                im.load()
                return to_rgb(ImageOps.exif_transpose(im))
    except _DECODE_ERRORS as e:
        raise UnusableImageError(f"{type(e).__name__}: {e}") from e


class Crop(NamedTuple):
    """A square crop relative to the image: side = scale * short side; u, v place it in [0, 1)."""

    scale: float = 1.0
    u: float = 0.5
    v: float = 0.5
    flip: bool = False


def crop_resize(im: Image.Image, size: int, crop: Crop = Crop()) -> Image.Image:
    """Cut the square `crop` out of `im` and resize it to size×size."""
    side = max(1, round(crop.scale * min(im.size)))
    x0 = min(int(crop.u * (im.width - side + 1)), im.width - side)
    y0 = min(int(crop.v * (im.height - side + 1)), im.height - side)
    box = (x0, y0, x0 + side, y0 + side)
    if side == size:
        im = im.crop(box)
    else:
        # BOX is the area filter when shrinking (no aliasing); bicubic when a small crop must grow.
        im = im.resize((size, size), Image.BOX if side > size else Image.BICUBIC, box=box)
    return im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if crop.flip else im


def to_tensor(im: Image.Image) -> torch.Tensor:
    """RGB PIL image -> 3×H×W float32 in [-1, 1]."""
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()


class _CropMaskDataset(Dataset):
    """The paper's transform: random square crop of side min(H, W) * U(crop_min, 1), resized to `size`."""

    def __init__(self, size: int, train: bool, crop_min: float, flip: bool, masks: dict | None):
        if not 0.0 < crop_min <= 1.0:
            raise ValueError(f"crop_min must be in (0, 1]; got {crop_min}")
        self.size = int(size)
        self.train = train
        self.crop_min = float(crop_min)
        self.flip = flip
        self.masks = MaskGenerator(size=self.size, **(masks or {}))

    @staticmethod
    def _parse_key(key: int | tuple[int, int], n: int) -> tuple[int, torch.Generator | None]:
        """`idx` or `(idx, seed)` -> (idx in [0, n), generator seeded with `seed` or None)."""
        idx, seed = key if isinstance(key, tuple) else (key, None)
        if not -n <= idx < n:
            raise IndexError(f"index {idx} out of range for {n} samples")
        return idx % n, None if seed is None else torch.Generator().manual_seed(int(seed))

    def _random_crop(self, generator: torch.Generator | None = None) -> Crop:
        # torch's RNG (global or per-sample), so worker seeding / seed_everything make crops reproducible.
        scale, u, v, f = torch.rand(4, generator=generator).tolist()
        return Crop(self.crop_min + (1.0 - self.crop_min) * scale, u, v, self.flip and f < 0.5)

    def _mask_seed(self, idx: int, generator: torch.Generator | None = None) -> int:
        # Validation masks are fixed per sample; training ones follow torch's RNG like the crops.
        return int(torch.randint(2**31, (), generator=generator)) if self.train else idx

    def _sample(self, im: Image.Image, crop: Crop, mask_seed: int, index: int, n_skipped: int = 0) -> dict:
        return {
            "index": index,  # the index drawn (before skips): which sample a batch row is
            "image": to_tensor(crop_resize(im, self.size, crop)),
            "mask": self.masks(mask_seed),
            "n_skipped": n_skipped,
        }


class _SkippingDataset(_CropMaskDataset):
    """Images from a source that may hold unusable ones: such an image is skipped (the next index
    is tried), logged and counted. Subclasses say how to decode an index and how to name it."""

    max_consecutive_failures = 50
    _log_first = 10
    _log_every = 100
    root = ""  # where the images come from, for messages

    def _decode(self, idx: int, min_side: int) -> Image.Image:  # raises UnusableImageError
        raise NotImplementedError

    def _name(self, idx: int) -> str:
        raise NotImplementedError

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        n = len(self)
        idx, generator = self._parse_key(key, n)
        crop = self._random_crop(generator) if self.train else Crop()
        seed = self._mask_seed(idx, generator)
        # The DCT downscale may shrink the image only as far as the crop still covers `size` px.
        min_side = math.ceil(self.size / crop.scale)
        reason = ""
        for k in range(min(n, self.max_consecutive_failures)):
            try:
                im = self._decode((idx + k) % n, min_side)
            except UnusableImageError as e:
                reason = str(e)
                self._report_skip(self._name((idx + k) % n), reason)
                continue
            return self._sample(im, crop, seed, idx, n_skipped=k)
        raise RuntimeError(
            f"{min(n, self.max_consecutive_failures)} consecutive images from {self._name(idx)} could not be "
            f"read (last error: {reason}); the image source under {self.root} looks broken"
        )

    def _report_skip(self, name: str, reason: str) -> None:
        self.skipped += 1
        if self.skipped <= self._log_first or self.skipped % self._log_every == 0:
            log.warning("skipping unusable image %s (%s); %d skipped so far in this process", name, reason, self.skipped)


class _FileImageDataset(_SkippingDataset):
    """Images from files under `root`."""

    def __init__(self, root: str, files: Sequence[str], size, train, crop_min, flip, masks):
        super().__init__(size, train, crop_min, flip, masks)
        self.root = root
        # One bytes array instead of a list of str: forked DataLoader workers touching a list's
        # refcounts would copy it page by page, i.e. once per worker for 1.28M ImageNet paths.
        self._files = np.array([os.fsencode(f) for f in files])
        self.skipped = 0  # per process: each DataLoader worker counts its own

    def __len__(self) -> int:
        return len(self._files)

    def path(self, idx: int) -> str:
        # os.path.join keeps absolute entries as they are.
        return os.path.join(self.root, os.fsdecode(self._files[idx]))

    _name = path

    def _decode(self, idx: int, min_side: int) -> Image.Image:
        return load_image(self.path(idx), min_side)


def _normalise_extensions(extensions: Sequence[str]) -> tuple[str, ...]:
    return tuple(sorted({("." + e.lower().lstrip(".")) for e in extensions}))


def _fingerprint(root: str, extensions: tuple[str, ...]) -> str:
    """Hash of the mtimes of `root` and its immediate subfolders (ImageNet's class folders).

    Adding or removing a file changes its folder's mtime, so this catches changes in the usual
    one- and two-level layouts without walking every file.
    """
    h = hashlib.sha1(f"{root}\0{','.join(extensions)}\0{os.stat(root).st_mtime_ns}".encode())
    subdirs = []
    with os.scandir(root) as entries:
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                if e.is_dir():
                    subdirs.append((e.name, e.stat().st_mtime_ns))
            except OSError:  # a symlink to itself (ELOOP) or one that vanished: _scan drops and logs it
                continue
    for name, mtime in sorted(subdirs):
        h.update(f"\0{name}\0{mtime}".encode(errors="surrogateescape"))
    return h.hexdigest()


_LOG_DROPS = 20  # entries dropped by a scan logged one by one; the summary counts all of them


def _scan(root: str, extensions: tuple[str, ...]) -> list[str]:
    """Image paths under `root`, relative to it, sorted. Follows symlinks, visiting each real folder once.

    Folders reached without a symlink are walked first, so a folder that is also linked from
    elsewhere is listed under its own path; symlinked folders come after, in sorted order.

    Hidden entries (".git", macOS "._x.jpg") are ignored. Dropped, counted and logged (each of the
    first few, then a summary by reason): a second way into an already visited folder (symlink
    loops such as `ln -s . loop`, which os.walk(followlinks=True) would follow 40 levels deep),
    symlinks that cannot be resolved (`ln -s self self`: ELOOP) or point nowhere, unreadable
    folders, and image names holding a newline (the file-list cache has one name per line).
    """
    files: list[str] = []
    dropped: dict[str, int] = {}

    def drop(path: str, reason: str) -> None:
        dropped[reason] = dropped.get(reason, 0) + 1
        if sum(dropped.values()) <= _LOG_DROPS:
            log.warning("file scan: dropping %r (%s)", path, reason)
        else:
            log.debug("file scan: dropping %r (%s)", path, reason)

    visited: set[tuple[int, int]] = set()
    stack, linked = [""], []  # folders relative to root (depth first, sorted); symlinked ones wait
    while stack or linked:
        rel = stack.pop() if stack else linked.pop(0)
        folder = os.path.join(root, rel) if rel else root
        try:
            st = os.stat(folder)
            key = (st.st_dev, st.st_ino)
            if key in visited:
                drop(folder, "folder already visited: a symlink loop or a second link to it")
                continue
            visited.add(key)
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            drop(folder, f"unreadable folder: {e.strerror or e}")
            continue
        subdirs = []
        for e in entries:
            if e.name.startswith("."):  # metadata, never images
                continue
            path = os.path.join(rel, e.name) if rel else e.name
            try:
                is_dir = e.is_dir()  # follows symlinks
                is_file = not is_dir and e.is_file()
            except OSError as err:  # ELOOP: a symlink to itself or a cycle of symlinks
                drop(os.path.join(root, path), f"unresolvable symlink: {err.strerror or err}")
                continue
            if is_dir:
                (linked if e.is_symlink() else subdirs).append(path)
            elif os.path.splitext(e.name)[1].lower() in extensions:
                if not is_file:
                    drop(os.path.join(root, path), "broken symlink or not a regular file")
                elif "\n" in e.name:
                    drop(os.path.join(root, path), "newline in the file name")
                else:
                    files.append(path)
        stack.extend(reversed(subdirs))
    if dropped:
        log.warning("file scan of %s kept %d images and dropped %d entries: %s", root, len(files),
                    sum(dropped.values()), "; ".join(f"{n} x {reason}" for reason, n in dropped.items()))
    return sorted(files)


def _default_caches(root: str) -> list[str]:
    home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    key = hashlib.sha1(os.fsencode(root)).hexdigest()[:16]
    return [os.path.join(root, CACHE_NAME), os.path.join(home, "ldm_asym", f"filelist-{key}.txt")]


def _read_cache(path: str, fingerprint: str) -> list[str] | None:
    try:
        # newline="\n": a "\r" in a file name must not split (or be translated into) a line.
        with open(path, encoding="utf-8", errors="surrogateescape", newline="\n") as f:
            if f.readline().rstrip("\n") != _CACHE_HEADER + fingerprint:
                return None
            return f.read().split("\n")[:-1]
    except OSError:
        return None


def _write_cache(path: str, root: str, extensions: tuple[str, ...], files: list[str]) -> bool:
    """Write the list atomically; False if `path` is not writable."""
    placeholder = _CACHE_HEADER + "0" * 40
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # Temporary names carry pid and a random token: unique even when ranks on several nodes
        # share the folder.
        with atomic_write(path, "w", encoding="utf-8", errors="surrogateescape", newline="\n") as f:
            f.write(placeholder + "\n")
            f.writelines(name + "\n" for name in files)
        # Creating the cache inside `root` changed root's mtime; fingerprint the folder as it is
        # now and patch the fixed-width header in place (that does not touch the folder's mtime).
        with open(path, "r+", encoding="utf-8") as f:
            f.write(_CACHE_HEADER + _fingerprint(root, extensions))
        return True
    except OSError:
        return False


def list_images(
    root: str | os.PathLike,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    cache_file: str | os.PathLike | None = None,
    refresh: bool = False,
) -> list[str]:
    """Sorted image paths under `root` (recursive, relative to it), cached in a text file.

    The cache (`cache_file`, else `<root>/.ldm_asym_filelist.txt`, else under ~/.cache/ldm_asym/)
    is reused while the mtimes of root and its subfolders are unchanged; `refresh` forces a rescan.
    Processes that start together (the ranks of a job) take turns behind a lock file beside the
    cache: the first scans and writes it, the others wait and read it.
    """
    root = os.path.abspath(root)
    extensions = _normalise_extensions(extensions)
    caches = [os.fspath(cache_file)] if cache_file is not None else _default_caches(root)
    if not refresh:
        files = _read_caches(caches, root, extensions)
        if files is not None:
            return files
    files = None
    for cache in caches:
        try:
            with FileLock(cache + ".lock", timeout=_LOCK_TIMEOUT_S):
                cached = None if refresh else _read_caches([cache], root, extensions)
                if cached is not None:  # another process wrote it while this one waited
                    return cached
                files = _scan(root, extensions) if files is None else files
                if _write_cache(cache, root, extensions, files):
                    return files
        except OSError:  # no lock file here (read-only folder) or a timeout: try the next place
            continue
    log.warning("could not write the file list cache to %s; %s will be rescanned next time", caches, root)
    return files if files is not None else _scan(root, extensions)


def _read_caches(caches: list[str], root: str, extensions: tuple[str, ...]) -> list[str] | None:
    fingerprint = _fingerprint(root, extensions)
    for cache in caches:
        files = _read_cache(cache, fingerprint)
        if files is not None:
            return files
    return None


class ImageFolderDataset(_FileImageDataset):
    """All images under `root` (recursively), in sorted order.

    `masks`: MaskGenerator kwargs (preset, p_full). `train=False` gives the center square crop and
    masks seeded by the sample index, so validation batches are identical across runs.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        size: int = 256,
        train: bool = True,
        crop_min: float = 0.5,
        flip: bool = False,
        masks: dict | None = None,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        cache_file: str | os.PathLike | None = None,
        refresh_cache: bool = False,
    ):
        root = os.path.abspath(root)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder not found: {root}")
        files = list_images(root, extensions, cache_file, refresh_cache)
        if not files:
            raise ValueError(f"no images ({', '.join(_normalise_extensions(extensions))}) found under {root}")
        super().__init__(root, files, size, train, crop_min, flip, masks)


class ImageNetDataset(ImageFolderDataset):
    """ImageNet in the standard layout `root/{train,val}/nXXXXXXXX/*.JPEG`; "val" is the fixed-crop split."""

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        size: int = 256,
        crop_min: float = 0.5,
        flip: bool = False,
        masks: dict | None = None,
        cache_file: str | os.PathLike | None = None,
        refresh_cache: bool = False,
    ):
        if split not in ("train", "val"):
            raise ValueError(f"ImageNet split must be 'train' or 'val'; got {split!r}")
        folder = os.path.join(os.path.abspath(root), split)
        if not os.path.isdir(folder):
            raise FileNotFoundError(
                f"ImageNet {split} folder not found: {folder} (expected {root}/{split}/nXXXXXXXX/*.JPEG; "
                f"set the dataset's `root` param to the ImageNet folder)"
            )
        super().__init__(
            folder, size, split == "train", crop_min, flip, masks, cache_file=cache_file, refresh_cache=refresh_cache
        )


class FileListDataset(_FileImageDataset):
    """Images named in a text file, one path per line, relative to `root` (default: the list's folder).

    Blank lines and lines starting with '#' are ignored. Listed files that are missing are skipped
    and counted at load time, like corrupt ones, rather than stat-ed up front.
    """

    def __init__(
        self,
        file_list: str | os.PathLike,
        root: str | os.PathLike | None = None,
        size: int = 256,
        train: bool = True,
        crop_min: float = 0.5,
        flip: bool = False,
        masks: dict | None = None,
    ):
        file_list = os.path.abspath(file_list)
        if not os.path.isfile(file_list):
            raise FileNotFoundError(f"file list not found: {file_list}")
        with open(file_list, encoding="utf-8", errors="surrogateescape") as f:
            files = [s for s in (line.strip() for line in f) if s and not s.startswith("#")]
        if not files:
            raise ValueError(f"file list {file_list} names no images")
        root = os.path.abspath(root) if root is not None else os.path.dirname(file_list)
        super().__init__(root, files, size, train, crop_min, flip, masks)


class SkimageDataset(_CropMaskDataset):
    """Crops of the real photographs bundled with scikit-image (no downloads), for demos and smoke runs.

    Train and val use disjoint photos. Each sample is a random crop of a random photo (train) or
    a crop fixed by the sample index (val). The default crop_min is lower than the paper's 0.5:
    a dozen photos at small `size` need tighter crops for variety of scale and content.
    """

    # All bundled in the scikit-image wheel (those fetched with pooch are left out). skimage.data.cat
    # is the same photo as chelsea, so it must not be added to the train list.
    TRAIN_PHOTOS = (
        "astronaut",
        "coffee",
        "rocket",
        "stereo_motorcycle",
        "immunohistochemistry",
        "hubble_deep_field",
        "retina",
        "coins",
        "moon",
        "clock",
        "brick",
        "grass",
        "gravel",
    )
    VAL_PHOTOS = ("chelsea", "camera")

    def __init__(
        self,
        split: str = "train",
        size: int = 64,
        n_crops: int | None = None,
        crop_min: float = 0.25,
        flip: bool = False,
        masks: dict | None = None,
    ):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val'; got {split!r}")
        super().__init__(size, split == "train", crop_min, flip, masks)
        self.split = split
        self.n_crops = n_crops if n_crops is not None else (2000 if self.train else 64)
        if self.n_crops < 1:
            raise ValueError(f"n_crops must be >= 1; got {self.n_crops}")
        self.photo_names = self.TRAIN_PHOTOS if self.train else self.VAL_PHOTOS
        self.photos = [self._load_photo(name) for name in self.photo_names]

    @staticmethod
    def _load_photo(name: str) -> Image.Image:
        import skimage.data  # imported here: only this demo dataset needs scikit-image

        array = getattr(skimage.data, name)()
        if isinstance(array, tuple):  # stereo_motorcycle: (left, right, disparity); the views are near-duplicates
            array = array[0]
        im = Image.fromarray(np.asarray(array))
        return to_rgb(im)

    def __len__(self) -> int:
        return self.n_crops

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        idx, generator = self._parse_key(key, self.n_crops)
        if not self.train:  # a fixed crop per index, whatever seed comes with it
            generator = torch.Generator().manual_seed(idx)
        photo = self.photos[int(torch.randint(len(self.photos), (), generator=generator))]
        return self._sample(photo, self._random_crop(generator), self._mask_seed(idx, generator), idx)
