"""Inpainting evaluation: the asymmetric decoder against the vanilla decoder and the "paste" fix.

Per image and mask, one set of latents (posterior mode of the evaluated model's frozen encoder)
is decoded three ways:

* ``vanilla``: the baseline's plain decoder (no image, no mask);
* ``paste``: vanilla with the known pixels pasted back, ``mask·vanilla + (1 - mask)·image``
  (binary mask) -- the naive fix the paper argues against: its unmasked error is 0 by
  construction, the seam it leaves shows in the boundary-band metrics;
* ``ours``: the evaluated decoder given the image and the mask (1 = hole).

Metrics come from `ldm_asym.metrics` (per image); this module only feeds, aggregates and writes
them. A metric whose weights are missing is reported unavailable with the reason, never dropped.
`evaluate()` is the whole pipeline; scripts/evaluate.py is its command line.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset

from ldm_asym import metrics as M
from ldm_asym.data.datasets import (
    _DECODE_ERRORS,
    IMAGE_EXTENSIONS,
    UnusableImageError,
    crop_resize,
    load_image,
    to_tensor,
)
from ldm_asym.data.masks import PRESETS, MaskGenerator, load_mask
from ldm_asym.util import atomic_write

log = logging.getLogger(__name__)

DECODERS = ("vanilla", "paste", "ours")
BAND_WIDTH = 8
LPIPS_NETS = ("vgg", "alex")
# Per-image metrics, in CSV / table order.
PER_IMAGE = (
    "psnr", "psnr_known", "psnr_hole", "ssim", "ssim_known", "ssim_hole",
    "unmasked_mse", "unmasked_mse_1e5", "unmasked_sse",
    "lpips_vgg", "lpips_vgg_band", "lpips_alex", "lpips_alex_band",
)
DEFINITIONS = {
    "psnr*": "PSNR in dB on [0, 1], over all / known (mask < 0.5) / hole pixels; 100 dB cap for identical pixels",
    "ssim*": "SSIM (Gaussian 11x11, sigma 1.5), map averaged over all / known / hole pixels "
             "(the 5-px image border excluded)",
    "unmasked_mse": "mean squared error over known pixels and channels, [0, 1] scale",
    "unmasked_mse_1e5": "unmasked_mse x 1e5, the unit of the paper's 'unmasked error' (DESIGN §8)",
    "unmasked_sse": "sum of squared errors over known pixels and channels per image, [0, 1] scale "
                    "(the authors' eval.py; grows with the image size)",
    "lpips_<net>": "standard LPIPS of the whole image",
    "lpips_<net>_band": f"spatial LPIPS averaged over pixels within {BAND_WIDTH} px of the hole boundary (both sides)",
    "fid": "Frechet Inception distance (2048-d pool features) between the decoded images and the inputs",
}
# What torch-fidelity (and torchmetrics' FID through it) downloads into the torch hub cache.
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
MASK_STEM = re.compile(r"_mask\d*$")


class Unavailable(Exception):
    """A metric cannot be computed here; the message is the reason reported for it."""


# ---------------------------------------------------------------------- inputs
def mask_seed(seed: int, index: int, k: int = 0) -> int:
    """A well-mixed 32-bit seed for mask `k` of image `index` (so neighbouring seeds don't correlate)."""
    return int(np.random.SeedSequence([seed, index, k]).generate_state(1)[0])


def list_eval_images(folder: str | os.PathLike) -> list[Path]:
    """Image files directly in `folder`, sorted; mask files (`*_mask.png`, `*_mask3.png`) excluded."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                   and not MASK_STEM.search(p.stem))
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    stems = [p.stem for p in files]
    dupes = sorted({s for s in stems if stems.count(s) > 1})
    if dupes:  # NAME.png and NAME.jpg would share NAME_mask.png and the output names
        raise ValueError(f"images share a name in {folder}: {', '.join(dupes)}")
    return files


def pair_masks(images: list[Path], masks_dir: str | os.PathLike, skip_missing: bool = False):
    """-> ([(image, NAME_mask.png)], [images without a mask]); a missing mask is an error unless skipped."""
    masks_dir = Path(masks_dir)
    if not masks_dir.is_dir():
        raise FileNotFoundError(f"mask folder not found: {masks_dir}")
    pairs, missing = [], []
    for image in images:
        mask = masks_dir / f"{image.stem}_mask.png"
        if mask.is_file():
            pairs.append((image, mask))
        elif skip_missing:
            missing.append(image)
        else:
            raise FileNotFoundError(f"no mask for {image}: expected {mask} (or pass --skip-missing-masks)")
    if not pairs:
        raise FileNotFoundError(f"none of the {len(images)} images has a NAME_mask.png in {masks_dir}")
    return pairs, missing


def load_eval_image(path: str | os.PathLike, size: int) -> torch.Tensor:
    """Center square crop (full short side) resized to size×size, 3×S×S in [-1, 1]."""
    try:
        return to_tensor(crop_resize(load_image(path), size))
    except UnusableImageError as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


def load_eval_mask(path: str | os.PathLike, size: int, image_size: tuple[int, int]) -> torch.Tensor:
    """A mask (white = hole) in the geometry of `load_eval_image`, 1×S×S in {0, 1}.

    The file is binarised at 0.5 at its own resolution (`load_mask`: soft edges, RGB), then cut
    and resized exactly as its image (area filter, binarised again at 0.5). A mask that is
    already size×size is taken as made for the cropped view (e.g. make_masks.py --size).
    `image_size` is the original image's (width, height).
    """
    hole = load_mask(path)[0].numpy()
    h, w = hole.shape
    if (w, h) == (size, size):
        return torch.from_numpy(hole)[None]
    if (w, h) != tuple(image_size):
        if abs(w / h - image_size[0] / image_size[1]) > 0.01:
            raise ValueError(f"mask {path} is {w}x{h} but its image is {image_size[0]}x{image_size[1]} "
                             f"(and it is not {size}x{size})")
        hole = np.asarray(Image.fromarray(hole).resize(image_size, Image.NEAREST))
    view = crop_resize(Image.fromarray(hole.astype(np.float32)), size)
    return torch.from_numpy((np.asarray(view) >= 0.5).astype(np.float32))[None]


def displayed_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) after EXIF rotation, as `load_image` returns it, from the header alone.

    ValueError naming the file for what `load_image` would refuse from its header: not an image,
    empty, or a decompression bomb (over Pillow's MAX_IMAGE_PIXELS). Truncated pixel data only
    shows when decoding.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                return (h, w) if im.getexif().get(0x0112) in (5, 6, 7, 8) else (w, h)
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}") from None
    except _DECODE_ERRORS as e:
        raise ValueError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


def printable(name: str | os.PathLike) -> str:
    """A file name as valid UTF-8 text: bytes that are not UTF-8 (Python's surrogate escapes) become `\\xNN`.

    CSV, JSON and Markdown outputs must be UTF-8; a non-UTF-8 name (Latin-1 `caf\\xe9.png`) would
    otherwise make writing them fail after all the work.
    """
    return os.fspath(name).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class EvalSet(Dataset):
    """(name, image, mask) items: masks from files, or a LaMa preset seeded per image index."""

    def __init__(self, images: list[Path], size: int, masks: list[Path] | None = None,
                 preset: str | None = None, seed: int = 0):
        if (masks is None) == (preset is None):
            raise ValueError("give mask files or a mask preset, not both")
        self.images, self.masks, self.size, self.seed = images, masks, size, seed
        self.generator = MaskGenerator(preset, size, p_full=0.0) if preset else None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        image = load_eval_image(self.images[i], self.size)
        if self.masks is not None:
            mask = load_eval_mask(self.masks[i], self.size, displayed_size(self.images[i]))
        else:
            mask = self.generator(mask_seed(self.seed, i))
        return {"name": self.images[i].stem, "image": image, "mask": mask}


# ---------------------------------------------------------------------- models
def _run_dir(ckpt: Path) -> Path | None:
    if ckpt.is_dir() and (ckpt / "checkpoints" / "last.ckpt").is_file():
        return ckpt
    if ckpt.is_file() and ckpt.parent.name == "checkpoints":
        return ckpt.parent.parent
    return None


def default_baseline(ckpt: str | os.PathLike, trust_pickle: bool = False) -> tuple[str, str]:
    """The SD VAE a training run started from (its `vae_source`) -> (source, where it was read).

    Read from `<run>/configs/*-project.yaml` (`model.params.vae_source`), else from the checkpoint's
    `hyper_parameters`. Anything else (diffusers folders, SD / authors' files) has no such record:
    ValueError asking for --baseline.
    """
    path = Path(ckpt)
    ask = "pass --baseline with the SD VAE whose vanilla decoder to compare against"
    run = _run_dir(path)
    found: tuple[object, str] | None = None
    if run is not None:
        from omegaconf import OmegaConf

        for cfg_file in sorted((run / "configs").glob("*-project.yaml"), reverse=True):
            cfg = OmegaConf.load(cfg_file)
            if OmegaConf.select(cfg, "model.params") is not None and "vae_source" in cfg.model.params:
                found = (OmegaConf.select(cfg, "model.params.vae_source"), str(cfg_file))
                break
    ckpt_file = path / "checkpoints" / "last.ckpt" if path.is_dir() else path
    if found is None and ckpt_file.is_file() and ckpt_file.suffix == ".ckpt":
        from ldm_asym.interop import read_checkpoint

        try:
            hp = read_checkpoint(ckpt_file, trust_pickle).get("hyper_parameters") or {}
        except ValueError as e:
            raise ValueError(f"cannot read the baseline from {ckpt_file} ({e}); {ask}") from e
        if "vae_source" in hp:
            found = (hp["vae_source"], f"{ckpt_file} hyper_parameters")
    if found is None:
        raise ValueError(f"{ckpt} is not one of our training checkpoints / run folders (no vae_source "
                         f"recorded), so there is no default baseline; {ask}")
    source, where = found
    if source is None:
        raise ValueError(f"{ckpt} was trained with vae_source: null (a random frozen encoder, per {where}), "
                         f"so it has no vanilla counterpart; {ask}")
    from ldm_asym.interop import HUB_ID

    if not Path(str(source)).exists() and not HUB_ID.match(str(source)):
        raise FileNotFoundError(f"the training run's vae_source {source} (from {where}) does not exist here; {ask}")
    return str(source), where


def compare_encoders(a: torch.nn.Module, b: torch.nn.Module) -> str | None:
    """None if both have identical encoder and quant_conv tensors, else what differs."""
    def frozen(m):
        return {k: v for k, v in m.state_dict().items() if k.startswith(("encoder.", "quant_conv."))}

    fa, fb = frozen(a), frozen(b)
    if set(fa) != set(fb):
        return f"different architectures ({len(set(fa) ^ set(fb))} tensors exist in only one)"
    diff = [k for k in fa if fa[k].shape != fb[k].shape or not torch.equal(fa[k].cpu(), fb[k].cpu())]
    return f"{len(diff)} of {len(fa)} tensors differ (first: {diff[0]})" if diff else None


class Reconstructor:
    """image, mask -> {"vanilla", "paste", "ours"}, all from one encoding (see the module doc)."""

    def __init__(self, model, baseline, shared_latents: bool = True):
        self.model, self.baseline, self.shared = model, baseline, shared_latents

    @torch.no_grad()
    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        hole = M.hole_region(mask)
        z = self.model.encode(image).mode()
        zb = z if self.shared else self.baseline.encode(image).mode()
        vanilla = self.baseline.decode(zb).clamp(-1, 1)
        return {
            "vanilla": vanilla,
            "paste": hole * vanilla + (1 - hole) * image,
            "ours": self.model.decode(z, image=image, mask=hole).clamp(-1, 1),
        }


# ---------------------------------------------------------------------- metrics
def build_lpips(random_trunk: bool = False) -> tuple[dict, dict[str, str]]:
    """-> ({net: MaskedLPIPS}, {metric: reason}) for the nets whose weights are missing."""
    nets, unavailable = {}, {}
    for net in LPIPS_NETS:
        try:
            nets[net] = M.MaskedLPIPS(net, pretrained=not random_trunk)
        except FileNotFoundError as e:
            unavailable[f"lpips_{net}"] = unavailable[f"lpips_{net}_band"] = str(e)
    return nets, unavailable


def image_metrics(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                  lpips: Mapping[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Every per-image metric of `PER_IMAGE` that can be computed, each (B,) on the CPU."""
    known, hole = M.known_region(mask), M.hole_region(mask)
    out = {}
    for name, region in (("", None), ("_known", known), ("_hole", hole)):
        out["psnr" + name] = M.psnr(pred, target, region)
        out["ssim" + name] = M.ssim(pred, target, region)
    out |= {
        "unmasked_mse": M.unmasked_error(pred, target, mask),
        "unmasked_sse": M.unmasked_error(pred, target, mask, reduction="sum"),
    }
    out["unmasked_mse_1e5"] = out["unmasked_mse"] * 1e5
    band = M.boundary_band(mask, BAND_WIDTH)
    for net, module in lpips.items():
        out[f"lpips_{net}"] = module(pred, target)
        out[f"lpips_{net}_band"] = module(pred, target, band)
    return {k: v.detach().float().cpu() for k, v in out.items()}


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||² + Tr(S1 + S2 - 2 (S1 S2)^½), with the trace of the root from eigenvalues."""
    mu1, sigma1, mu2, sigma2 = (torch.as_tensor(t, dtype=torch.float64) for t in (mu1, sigma1, mu2, sigma2))
    root = torch.linalg.eigvals(sigma1 @ sigma2).sqrt().real.sum()
    return float((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * root)


def build_inception(weights: str | os.PathLike | None = None) -> torch.nn.Module:
    """FID's Inception (torchmetrics' wrapper of torch-fidelity's), from a local weights file only.

    `weights` None looks for torch-fidelity's own file in the torch hub cache. Raises `Unavailable`.
    """
    if weights is None:
        weights = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
        if not weights.is_file():
            raise Unavailable(f"no Inception weights: pass --inception-weights PATH ({INCEPTION_FILE}, the "
                              f"torch-fidelity / torchmetrics FID network; not in {weights.parent})")
    elif not Path(weights).is_file():
        raise Unavailable(f"Inception weights file not found: {weights}")
    try:
        import torch_fidelity  # noqa: F401  (torchmetrics' FID network comes from it)
        from torchmetrics.image.fid import NoTrainInceptionV3
    except ImportError as e:
        raise Unavailable(f"FID needs torch-fidelity (pip install torch-fidelity): {e}") from e
    return NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                              feature_extractor_weights_path=str(weights))


class FID:
    """Feature sums per set ("real" and one per decoder), so the real images go through Inception once.

    `extractor` maps uint8 B×3×H×W images to B×D features (`build_inception()`, or any module in tests).
    """

    def __init__(self, extractor: torch.nn.Module):
        self.extractor = extractor.eval()
        self.stats: dict[str, list] = {}

    @torch.no_grad()
    def add(self, key: str, images: torch.Tensor) -> None:
        """Images in [-1, 1] -> quantised to uint8 as saved images would be."""
        u8 = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        f = self.extractor(u8).double().cpu()
        s = self.stats.setdefault(key, [0, torch.zeros(f.shape[1], dtype=torch.float64),
                                        torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64)])
        s[0] += f.shape[0]
        s[1] += f.sum(0)
        s[2] += f.T @ f

    def _gaussian(self, key: str):
        n, total, outer = self.stats[key]
        mu = total / n
        return mu, (outer - n * torch.outer(mu, mu)) / (n - 1)  # unbiased, as torchmetrics

    def compute(self, key: str, real: str = "real") -> float:
        n = min(self.stats.get(key, [0])[0], self.stats.get(real, [0])[0])
        if n < 2:
            raise Unavailable(f"FID needs at least 2 images; got {n}")
        return frechet_distance(*self._gaussian(key), *self._gaussian(real))


# ---------------------------------------------------------------------- running
@dataclass
class Results:
    rows: list[dict] = field(default_factory=list)  # one per (image, decoder)
    fid: dict[str, float | str] = field(default_factory=dict)  # decoder -> value, or the reason


def run(loader, reconstruct: Callable, lpips: Mapping, fid: FID | None = None,
        on_batch: Callable | None = None, progress=None) -> Results:
    """Decode every batch, score every decoder, accumulate FID features; `on_batch` gets the outputs."""
    res = Results()
    for batch in loader:
        image, mask, names = batch["image"], batch["mask"], batch["name"]
        outs = reconstruct(image, mask)
        if fid is not None:
            fid.add("real", image)
        hole_fraction = M.hole_region(mask).mean(dim=(1, 2, 3)).cpu()
        for dec, pred in outs.items():
            scores = image_metrics(pred, image, mask, lpips)
            if fid is not None:
                fid.add(dec, pred)
            for i, name in enumerate(names):
                row = {"image": name, "decoder": dec, "hole_fraction": float(hole_fraction[i])}
                res.rows.append(row | {k: float(v[i]) for k, v in scores.items()})
        if on_batch is not None:
            on_batch(names, image, mask, outs)
        if progress is not None:
            progress.update(len(names))
    if fid is not None:
        for dec in dict.fromkeys(r["decoder"] for r in res.rows):
            try:
                res.fid[dec] = fid.compute(dec)
            except Unavailable as e:
                res.fid[dec] = str(e)
    return res


def summarise(res: Results, unavailable: Mapping[str, str], notes: Mapping[str, str] | None = None) -> dict:
    """Per decoder and metric: {available, mean, std, n} (n: images with a defined value) or the reason."""
    notes = notes or {}
    out = {}
    for dec in dict.fromkeys(r["decoder"] for r in res.rows):
        rows = [r for r in res.rows if r["decoder"] == dec]
        entry = {}
        for key in PER_IMAGE:
            if key in unavailable or key not in rows[0]:
                entry[key] = {"available": False, "reason": unavailable.get(key, "not computed")}
                continue
            v = np.array([r[key] for r in rows], dtype=np.float64)
            ok = v[np.isfinite(v)]
            entry[key] = {"available": True, "mean": float(ok.mean()) if ok.size else math.nan,
                          "std": float(ok.std()) if ok.size else math.nan, "n": int(ok.size)}
        fid = res.fid.get(dec, unavailable.get("fid", "not computed"))
        entry["fid"] = ({"available": True, "value": fid, "n": len(rows)} if isinstance(fid, float)
                        else {"available": False, "reason": fid})
        for key, note in notes.items():
            if entry.get(key, {}).get("available"):
                entry[key]["note"] = note
        out[dec] = entry
    return out


# ---------------------------------------------------------------------- outputs
def _u8(x: torch.Tensor) -> np.ndarray:
    """C×H×W in [-1, 1] (C = 1 is shown as gray) -> H×W×3 uint8."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte()
    return x.permute(1, 2, 0).expand(-1, -1, 3).numpy()


def grid_image(panels: list[tuple[str, np.ndarray]], min_side: int = 128) -> Image.Image:
    """Panels side by side, each labelled; small images are enlarged (nearest) so labels fit."""
    h, w = panels[0][1].shape[:2]
    scale = max(1, math.ceil(min_side / min(h, w)))
    bar = 14
    out = Image.new("RGB", (len(panels) * w * scale, h * scale + bar), "white")
    draw = ImageDraw.Draw(out)
    for i, (label, arr) in enumerate(panels):
        out.paste(Image.fromarray(arr).resize((w * scale, h * scale), Image.NEAREST), (i * w * scale, bar))
        draw.text((i * w * scale + 3, 1), label, fill="black")
    return out


class GridWriter:
    """`grids/NAME.png`: input, mask, vanilla, paste, ours, |ours - input|×gain, for the first `max_grids` images."""

    def __init__(self, folder: str | os.PathLike, max_grids: int = 16, gain: float = 4.0):
        self.folder, self.left, self.gain = Path(folder), max_grids, gain
        self.written: list[Path] = []

    def __call__(self, names, image, mask, outs) -> None:
        for i, name in enumerate(names):
            if self.left <= 0:
                return
            diff = ((outs["ours"][i] - image[i]).abs() / 2 * self.gain).clamp(0, 1) * 2 - 1
            panels = [("input", _u8(image[i])), ("mask", _u8(M.hole_region(mask[i]) * 2 - 1))]
            panels += [(d, _u8(outs[d][i])) for d in DECODERS if d in outs]
            panels.append((f"|ours-input|x{self.gain:g}", _u8(diff)))
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.folder / f"{name}.png"
            with atomic_write(path, "wb") as f:
                grid_image(panels).save(f, format="PNG")
            self.written.append(path)
            self.left -= 1


def _no_nan(obj):
    """NaN (a region empty in every image) -> null, so summary.json stays strict JSON."""
    if isinstance(obj, dict):
        return {k: _no_nan(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_no_nan(v) for v in obj]
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj


def _fmt(v) -> str:
    return "" if v is None else f"{v:.6g}"


def csv_text(rows: list[dict]) -> str:
    """One row per (image, decoder); unavailable metrics are empty cells, empty regions 'nan'."""
    cols = ["image", "decoder", "hole_fraction", *PER_IMAGE]
    f = io.StringIO(newline="")
    w = csv.writer(f)
    w.writerow(cols)
    for r in rows:
        w.writerow([printable(r["image"]), r["decoder"]] + [_fmt(r.get(k)) for k in cols[2:]])
    return f.getvalue()


def write_csv(path: str | os.PathLike, rows: list[dict]) -> None:
    """`csv_text(rows)` written atomically as UTF-8."""
    write_text(path, csv_text(rows))


def write_text(path: str | os.PathLike, text: str) -> None:
    """UTF-8 `text` to `path`, atomically (a crash leaves the old file or none, never half of one)."""
    with atomic_write(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)


TABLE = (("PSNR", "psnr"), ("PSNR known", "psnr_known"), ("PSNR hole", "psnr_hole"), ("SSIM", "ssim"),
         ("SSIM known", "ssim_known"), ("SSIM hole", "ssim_hole"), ("unmasked MSE ×1e-5", "unmasked_mse_1e5"),
         ("unmasked SSE", "unmasked_sse"), ("LPIPS vgg", "lpips_vgg"), ("LPIPS vgg band", "lpips_vgg_band"),
         ("LPIPS alex", "lpips_alex"), ("LPIPS alex band", "lpips_alex_band"), ("FID", "fid"))


def markdown(summary: dict) -> str:
    """summary.md: the table, the setup, and every unavailable metric with its reason."""
    cfg, decs = summary["config"], summary["decoders"]
    lines = ["# Inpainting evaluation", "",
             f"{cfg['n_images']} images at {cfg['size']}², masks: {cfg['masks']}; ckpt `{cfg['ckpt']}`, "
             f"baseline `{cfg['baseline']}`. {cfg['latents']}.", "",
             "| decoder | " + " | ".join(h for h, _ in TABLE) + " |", "|---" * (len(TABLE) + 1) + "|"]
    for dec, entry in decs.items():
        cells = []
        for _, key in TABLE:
            e = entry[key]
            cells.append("n/a" if not e["available"] else f"{e.get('mean', e.get('value')):.4g}")
        lines.append(f"| {dec} | " + " | ".join(cells) + " |")
    reasons = {k: e["reason"] for entry in decs.values() for k, e in entry.items() if not e["available"]}
    notes = {k: e["note"] for entry in decs.values() for k, e in entry.items() if e.get("note")}
    lines += [""] + [f"- **{k}** unavailable: {r}" for k, r in reasons.items()]
    lines += [f"- **{k}**: {n}" for k, n in notes.items()]
    lines += [f"- warning: {w}" for w in summary.get("warnings", [])]
    lines += ["", "Definitions:", ""] + [f"- `{k}`: {v}" for k, v in DEFINITIONS.items()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- the pipeline
def evaluate(
    ckpt: str, images: str, out: str, *, baseline: str | None = None, masks: str | None = None,
    mask_preset: str | None = None, seed: int = 0, size: int = 512, batch_size: int = 4,
    device: str | None = None, ema: bool = False, trust_pickle: bool = False, lpips_random: bool = False,
    inception_weights: str | None = None, max_grids: int = 16, diff_gain: float = 4.0,
    skip_missing_masks: bool = False, workers: int = 0, progress: bool = True,
) -> dict:
    """Evaluate `ckpt` (and its baseline) on a folder of images; writes `out/` and returns the summary."""
    from ldm_asym.interop import load_autoencoder

    if (masks is None) == (mask_preset is None):
        raise ValueError("give either --masks DIR or --mask-preset NAME")
    if mask_preset is not None and mask_preset not in PRESETS:
        raise ValueError(f"unknown mask preset {mask_preset!r}; valid: {', '.join(PRESETS)}")
    if batch_size < 1 or max_grids < 0:
        raise ValueError(f"--batch-size must be >= 1 and --max-grids >= 0; got {batch_size}, {max_grids}")
    if size < 16 or size % 8:
        raise ValueError(f"--size must be a multiple of 8 and >= 16; got {size}")
    files = list_eval_images(images)
    for f in files:  # an empty / non-image / bomb file fails here, before minutes of model loading and decoding
        displayed_size(f)
    missing: list[Path] = []
    mask_files = None
    if masks is not None:
        pairs, missing = pair_masks(files, masks, skip_missing_masks)
        files, mask_files = [p[0] for p in pairs], [p[1] for p in pairs]
    warnings_: list[str] = []
    if missing:
        warnings_.append(f"skipped {len(missing)} images without a mask: "
                         f"{', '.join(printable(p.name) for p in missing[:10])}")

    baseline_from = "--baseline"
    if baseline is None:
        baseline, baseline_from = default_baseline(ckpt, trust_pickle)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    run_dir = _run_dir(Path(ckpt)) if Path(ckpt).is_dir() else None
    source = run_dir / "checkpoints" / "last.ckpt" if run_dir and ema else ckpt  # EMA lives in the file
    model = load_autoencoder(source, use_ema=ema, trust_pickle=trust_pickle).to(device).eval()
    base = load_autoencoder(baseline, trust_pickle=trust_pickle).to(device).eval()
    if size % model.downsample_factor:
        raise ValueError(f"--size must be a multiple of {model.downsample_factor}; got {size}")
    differ = compare_encoders(model, base)
    if differ is None:
        latents = "All decoders decode the same latents (posterior mode of the evaluated model's encoder)"
    else:
        latents = (f"The encoders differ ({differ}): vanilla/paste decode the baseline encoder's own latents, "
                   f"so the comparison is not like for like")
        warnings_.append(latents)
    if model.blend == "none":
        warnings_.append("the evaluated model has no conditional branch (blend none): 'ours' ignores the known pixels")
    for w in warnings_:
        log.warning(w)

    torch.manual_seed(seed)  # a random LPIPS trunk (--lpips-random) is then the same every run
    lpips, unavailable = build_lpips(lpips_random)
    lpips = {k: v.to(device) for k, v in lpips.items()}
    notes = {}
    if lpips_random:
        for net in lpips:
            notes[f"lpips_{net}"] = notes[f"lpips_{net}_band"] = \
                "random LPIPS trunk (--lpips-random): for tests only, not comparable with published LPIPS"
    fid = None
    try:
        fid = FID(build_inception(inception_weights).to(device))
    except Unavailable as e:
        unavailable["fid"] = str(e)

    dataset = EvalSet(files, size, masks=mask_files, preset=mask_preset, seed=seed)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    grids = GridWriter(out / "grids", max_grids, diff_gain)
    from tqdm import tqdm

    reconstruct = Reconstructor(model, base, shared_latents=differ is None)
    with tqdm(total=len(dataset), unit="img", desc="evaluate", disable=not progress) as bar:
        def to_device(loader):
            for b in loader:
                yield b | {"image": b["image"].to(device), "mask": b["mask"].to(device)}

        res = run(to_device(loader), reconstruct, lpips, fid, on_batch=grids, progress=bar)

    summary = {
        "config": {
            "ckpt": printable(ckpt), "ema": ema, "baseline": printable(baseline),
            "baseline_from": printable(baseline_from), "images": printable(images), "size": size,
            "masks": printable(masks) if masks is not None else f"preset {mask_preset} (seed {seed})",
            "n_images": len(dataset), "skipped_missing_masks": len(missing), "seed": seed,
            "device": str(device), "batch_size": batch_size, "latents": latents,
            "lpips": "random trunk (--lpips-random; tests only)" if lpips_random else "pretrained",
            "blend": model.blend,
        },
        "decoders": summarise(res, unavailable, notes),
        "definitions": DEFINITIONS,
        "warnings": warnings_,
        "grids": [printable(p.relative_to(out)) for p in grids.written],
    }
    # Every output is rendered before any is written, and each is written atomically: a failure
    # leaves no truncated file, and summary.json (what says "this run finished") is written last.
    texts = {"per_image.csv": csv_text(res.rows), "summary.md": markdown(summary),
             "summary.json": json.dumps(_no_nan(summary), indent=2, allow_nan=False) + "\n"}
    for name, text in texts.items():
        write_text(out / name, text)
    return summary
