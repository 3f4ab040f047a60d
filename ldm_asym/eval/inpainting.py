"""Inpainting evaluation: the asymmetric decoder against the vanilla decoder and the "paste" fix.

The decodings are those of `ldm_asym.eval.decoders`; per-image metrics come from `ldm_asym.metrics`,
FID from torchmetrics (`ldm_asym.eval.inception`). A metric whose weights are missing is reported
unavailable with the reason, never dropped. `evaluate()` is the whole task; scripts/evaluate.py
(--task inpaint, the default) is its command line.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch.utils.data import DataLoader

from ldm_asym import metrics as M
from ldm_asym.data.masks import PRESETS
from ldm_asym.eval import models, report
from ldm_asym.eval.data import EvalSet, check_headers, list_eval_images, pair_masks, printable
from ldm_asym.eval.decoders import DECODERS, Reconstructor, compare_encoders, default_baseline, run_dir
from ldm_asym.eval.inception import FIDSet

log = logging.getLogger(__name__)

BAND_WIDTH = 8
# Per-image metrics, in CSV / table order.
PER_IMAGE = (
    "psnr", "psnr_known", "psnr_hole", "ssim", "ssim_known", "ssim_hole",
    "unmasked_mse", "unmasked_mse_1e5", "unmasked_sse",
    "lpips_vgg", "lpips_vgg_band", "lpips_alex", "lpips_alex_band",
)
DEFINITIONS = {
    "psnr*": "PSNR in dB on [0, 1], over all / known (mask < 0.5) / hole pixels; 100 dB cap for identical pixels",
    "ssim*": "SSIM (Gaussian 11x11, sigma 1.5; torchmetrics' map), averaged over all / known / hole pixels "
             "(the 5-px image border excluded)",
    "unmasked_mse": "mean squared error over known pixels and channels, [0, 1] scale",
    "unmasked_mse_1e5": "unmasked_mse x 1e5, the unit of the paper's 'unmasked error' (DESIGN §8)",
    "unmasked_sse": "sum of squared errors over known pixels and channels per image, [0, 1] scale "
                    "(the authors' eval.py; grows with the image size)",
    "lpips_<net>": "standard LPIPS of the whole image",
    "lpips_<net>_band": f"spatial LPIPS averaged over pixels within {BAND_WIDTH} px of the hole boundary (both sides)",
    "fid": "Frechet Inception distance (torchmetrics, 2048-d pool features) between the decoded images and the inputs",
}
TABLE = (("PSNR", "psnr"), ("PSNR known", "psnr_known"), ("PSNR hole", "psnr_hole"), ("SSIM", "ssim"),
         ("SSIM known", "ssim_known"), ("SSIM hole", "ssim_hole"), ("unmasked MSE ×1e-5", "unmasked_mse_1e5"),
         ("unmasked SSE", "unmasked_sse"), ("LPIPS vgg", "lpips_vgg"), ("LPIPS vgg band", "lpips_vgg_band"),
         ("LPIPS alex", "lpips_alex"), ("LPIPS alex band", "lpips_alex_band"), ("FID", "fid"))


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


@dataclass
class Results:
    rows: list[dict] = field(default_factory=list)  # one per (image, decoder)
    fid: dict[str, float | str] = field(default_factory=dict)  # decoder -> value, or the reason


def run(loader, reconstruct: Callable, lpips: Mapping, fid: FIDSet | None = None,
        on_batch: Callable | None = None, progress=None) -> Results:
    """Decode every batch, score every decoder, accumulate FID features; `on_batch` gets the outputs."""
    res = Results()
    for batch in loader:
        image, mask, names = batch["image"], batch["mask"], batch["name"]
        outs = reconstruct(image, mask)
        if fid is not None:
            fid.add_real(image)
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
            except models.Unavailable as e:
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
                entry[key] = report.unavailable(unavailable.get(key, "not computed"))
            else:
                entry[key] = report.stats(r[key] for r in rows)
        fid = res.fid.get(dec, unavailable.get("fid", "not computed"))
        entry["fid"] = ({"available": True, "value": fid, "n": len(rows)} if isinstance(fid, float)
                        else report.unavailable(fid))
        for key, note in notes.items():
            if entry.get(key, {}).get("available"):
                entry[key]["note"] = note
        out[dec] = entry
    return out


def csv_text(rows: list[dict]) -> str:
    """per_image.csv: one row per (image, decoder); unavailable metrics are empty cells, empty regions 'nan'."""
    return report.csv_text(rows, ["image", "decoder", "hole_fraction", *PER_IMAGE], ("image", "decoder"))


def write_csv(path, rows: list[dict]) -> None:
    """`csv_text(rows)` written atomically as UTF-8."""
    report.write_text(path, csv_text(rows))


def markdown(summary: dict) -> str:
    """summary.md: the table, the setup, and every unavailable metric with its reason."""
    cfg, decs = summary["config"], summary["decoders"]
    lines = ["# Inpainting evaluation", "",
             f"{cfg['n_images']} images at {cfg['size']}², masks: {cfg['masks']}; ckpt `{cfg['ckpt']}`, "
             f"baseline `{cfg['baseline']}`. {cfg['latents']}.", ""]
    lines += report.table(TABLE, decs, "decoder")
    lines += report.notes_lines(decs.values(), summary.get("warnings", []), DEFINITIONS)
    return "\n".join(lines) + "\n"


class GridWriter:
    """`grids/NAME.png`: input, mask, vanilla, paste, ours, |ours - input|×gain, for the first `max_grids` images."""

    def __init__(self, folder, max_grids: int = 16, gain: float = 4.0):
        self.folder, self.left, self.gain = Path(folder), max_grids, gain
        self.written: list[Path] = []

    def __call__(self, names, image, mask, outs) -> None:
        u8 = report.to_u8_hwc
        for i, name in enumerate(names):
            if self.left <= 0:
                return
            diff = ((outs["ours"][i] - image[i]).abs() / 2 * self.gain).clamp(0, 1) * 2 - 1
            panels = [("input", u8(image[i])), ("mask", u8(M.hole_region(mask[i]) * 2 - 1))]
            panels += [(d, u8(outs[d][i])) for d in DECODERS if d in outs]
            panels.append((f"|ours-input|x{self.gain:g}", u8(diff)))
            path = self.folder / f"{name}.png"
            report.write_grid(path, panels)
            self.written.append(path)
            self.left -= 1


def _check_args(masks, mask_preset, size, batch_size, max_grids) -> None:
    if (masks is None) == (mask_preset is None):
        raise ValueError("give either --masks DIR or --mask-preset NAME")
    if mask_preset is not None and mask_preset not in PRESETS:
        raise ValueError(f"unknown mask preset {mask_preset!r}; valid: {', '.join(PRESETS)}")
    if batch_size < 1 or max_grids < 0:
        raise ValueError(f"--batch-size must be >= 1 and --max-grids >= 0; got {batch_size}, {max_grids}")
    if size < 16 or size % 8:
        raise ValueError(f"--size must be a multiple of 8 and >= 16; got {size}")


def evaluate(
    ckpt: str, images: str, out: str, *, baseline: str | None = None, masks: str | None = None,
    mask_preset: str | None = None, seed: int = 0, size: int = 512, batch_size: int = 4,
    device: str | None = None, ema: bool = False, trust_pickle: bool = False, lpips_random: bool = False,
    inception_weights: str | None = None, max_grids: int = 16, diff_gain: float = 4.0,
    skip_missing_masks: bool = False, workers: int = 0, progress: bool = True,
) -> dict:
    """Evaluate `ckpt` (and its baseline) on a folder of images; writes `out/` and returns the summary."""
    from ldm_asym.interop import load_autoencoder

    _check_args(masks, mask_preset, size, batch_size, max_grids)
    files = list_eval_images(images)
    check_headers(files)
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
    run_folder = run_dir(Path(ckpt)) if Path(ckpt).is_dir() else None
    source = run_folder / "checkpoints" / "last.ckpt" if run_folder and ema else ckpt  # EMA lives in the file
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
    lpips, unavailable = models.build_lpips(lpips_random)
    lpips = {k: v.to(device) for k, v in lpips.items()}
    notes = {}
    if lpips_random:
        for net in lpips:
            notes[f"lpips_{net}"] = notes[f"lpips_{net}_band"] = \
                "random LPIPS trunk (--lpips-random): for tests only, not comparable with published LPIPS"
    fid = None
    try:
        fid = FIDSet(models.build_inception(inception_weights).to(device), DECODERS).to(device)
    except models.Unavailable as e:
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
            "task": "inpaint", "ckpt": printable(ckpt), "ema": ema, "baseline": printable(baseline),
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
    report.write_outputs(out, {"per_image.csv": csv_text(res.rows), "summary.md": markdown(summary),
                               "summary.json": report.json_text(summary)})
    return summary
