"""Paint-by-Example evaluation (COCOEE protocol): region CLIP score, pre error, FID.

Inputs are folders paired by sample name (`data.pair_by_stem`; COCOEE's `_GT` / `_mask` / `_ref`
suffixes are ignored): the edited results, the unedited sources, the masks (white = edited region)
and the exemplar references. Per sample:

* ``clip_score``: the result cropped to the mask's bounding box and resized to the CLIP input
  size (224, bilinear, antialiased), the reference resized to the same size (bicubic, as PIL's
  default in the Paint-by-Example code), both normalised with the CLIP processor's mean and std;
  100 × the cosine similarity of their CLIP image embeddings (torchmetrics' `cosine_similarity`).
* ``pre_error_*``: the error on the unedited (known) pixels between result and source,
  `metrics.unmasked_error` (mean, ×1e5, and the per-image sum the authors' eval.py averages).

And over the set: FID (torchmetrics) between the results and a reference folder (by default the
sources), each center-cropped and resized to --size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchmetrics.functional import cosine_similarity

from ldm_asym import metrics as M
from ldm_asym.data.datasets import to_tensor
from ldm_asym.data.masks import load_mask
from ldm_asym.eval import models, report
from ldm_asym.eval.data import FolderSet, check_headers, list_images, load_full_image, pair_by_stem, printable
from ldm_asym.eval.inception import FIDSet

PER_IMAGE = ("clip_score", "pre_error_mse", "pre_error_mse_1e5", "pre_error_sse")
DEFINITIONS = {
    "clip_score": "100 x cosine similarity of CLIP image embeddings: the result cropped to the mask's bounding "
                  "box and the reference, each resized to 224 (COCOEE region CLIP score)",
    "pre_error_mse": "mean squared error between result and source over unedited pixels (mask < 0.5) and "
                     "channels, [0, 1] scale; _1e5 is the same x 1e5",
    "pre_error_sse": "sum of those squared errors per image (the authors' eval.py; grows with the image size)",
    "fid": "Frechet Inception distance (torchmetrics, 2048-d pool features) between the results and the "
           "FID reference folder, all center-cropped to squares of --size",
}
TABLE = (("CLIP score", "clip_score"), ("pre error MSE ×1e-5", "pre_error_mse_1e5"),
         ("pre error SSE", "pre_error_sse"), ("FID", "fid"))


def mask_box(hole: torch.Tensor) -> tuple[int, int, int, int] | None:
    """(top, left, bottom, right), end-exclusive, of the pixels where `hole` (H×W) is set; None if empty.

    (Paint-by-Example's script takes the first and last hole pixel in raster order and drops the
    last row and column; for its rectangular COCOEE masks that is this box less one pixel.)
    """
    rows, cols = torch.nonzero(hole.bool(), as_tuple=True)
    if rows.numel() == 0:
        return None
    return int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1


def region_crop(image01: torch.Tensor, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """3×H×W in [0, 1] cut to `box` and resized to size×size (bilinear, antialiased)."""
    top, left, bottom, right = box
    crop = image01[None, :, top:bottom, left:right]
    return F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]


def reference_view(path, size: int) -> torch.Tensor:
    """The reference image resized (not cropped) to size×size with PIL's bicubic filter, 3×S×S in [0, 1]."""
    im = load_full_image(path).resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


@torch.no_grad()
def region_clip_score(clip: torch.nn.Module, crops01: torch.Tensor, refs01: torch.Tensor) -> torch.Tensor:
    """(B,) 100 × cos(CLIP(crop), CLIP(reference)) for images already at the CLIP input size."""
    return 100.0 * cosine_similarity(clip(crops01), clip(refs01), reduction="none")


class PBESet(Dataset):
    """Per sample: the region crop and reference at `clip_size`, and the pre error (computed here, on the CPU).

    Source and mask are resized to the result's size when they differ (bicubic / nearest), as a
    pipeline that edits at a fixed size does; `resized` counts those samples.
    """

    def __init__(self, samples: list[dict], clip_size: int):
        self.samples, self.clip_size = samples, clip_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        s = self.samples[i]
        result = load_full_image(s["primary"])
        source = load_full_image(s["sources"])
        size = (result.height, result.width)
        resized = source.size != result.size
        if resized:
            source = source.resize(result.size, Image.BICUBIC)
        mask = load_mask(s["masks"])
        if tuple(mask.shape[-2:]) != size:
            mask, resized = load_mask(s["masks"], size=size), True
        x, y = to_tensor(result)[None], to_tensor(source)[None]
        box = mask_box(M.hole_region(mask)[0])
        crop = (region_crop((x[0] + 1) / 2, box, self.clip_size) if box is not None
                else torch.zeros(3, self.clip_size, self.clip_size))
        mse = M.unmasked_error(x, y, mask[None])[0]
        return {"name": s["name"], "crop": crop, "reference": reference_view(s["references"], self.clip_size),
                "has_box": box is not None, "hole_fraction": float(M.hole_region(mask).mean()),
                "pre_error_mse": float(mse), "pre_error_mse_1e5": float(mse) * 1e5,
                "pre_error_sse": float(M.unmasked_error(x, y, mask[None], reduction="sum")[0]), "resized": resized}


def score_samples(loader, clip: torch.nn.Module | None, device) -> list[dict]:
    """One row per sample: hole fraction, pre errors, and the CLIP score (NaN without a mask box, absent without CLIP)."""
    rows = []
    for b in loader:
        scores = None
        if clip is not None:
            scores = region_clip_score(clip, b["crop"].to(device), b["reference"].to(device)).cpu()
            scores = torch.where(b["has_box"], scores, torch.full_like(scores, float("nan")))
        for i, name in enumerate(b["name"]):
            row = {"image": name, "resized": bool(b["resized"][i]), "hole_fraction": float(b["hole_fraction"][i])}
            row |= {k: float(b[k][i]) for k in PER_IMAGE[1:]}
            if scores is not None:
                row["clip_score"] = float(scores[i])
            rows.append(row)
    return rows


def folder_fid(features: torch.nn.Module, fake: list[Path], real: list[Path], size: int, batch_size: int,
               workers: int, device) -> float:
    """FID (torchmetrics) of the `fake` images against the `real` ones, both via `load_eval_image`."""
    fid = FIDSet(features, ["fake"]).to(device)
    for files, add in ((real, fid.add_real), (fake, lambda x: fid.add("fake", x))):
        for b in DataLoader(FolderSet(files, size), batch_size=batch_size, num_workers=workers):
            add(b["image"].to(device))
    return fid.compute("fake")


def markdown(summary: dict) -> str:
    cfg, entry = summary["config"], summary["metrics"]
    lines = ["# Paint-by-Example evaluation (COCOEE protocol)", "",
             f"{cfg['n_images']} results in `{cfg['results']}`; FID against `{cfg['fid_reference']}` at {cfg['size']}².", ""]
    lines += report.table(TABLE, {"results": entry}, "set")
    lines += report.notes_lines([entry], summary.get("warnings", []), DEFINITIONS)
    return "\n".join(lines) + "\n"


def evaluate_pbe(results: str, sources: str, masks: str, references: str, out: str, *, clip: str | None = None,
                 fid_reference: str | None = None, inception_weights: str | None = None, size: int = 512,
                 batch_size: int = 8, device: str | None = None, workers: int = 0) -> dict:
    """Score a folder of Paint-by-Example results; writes `out/` (summary.json, summary.md, per_image.csv)."""
    if batch_size < 1 or size < 16:
        raise ValueError(f"--batch-size must be >= 1 and --size >= 16; got {batch_size}, {size}")
    files = list_images(results, what="result", skip_masks=False)
    samples = pair_by_stem(files, sources=sources, masks=masks, references=references)
    fid_files = list_images(fid_reference or sources, what="FID reference", skip_masks=False)
    check_headers(files + [s[k] for s in samples for k in ("sources", "masks", "references")] + fid_files)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    unavailable: dict[str, str] = {}
    try:
        clip_net = models.build_clip(clip).to(device)
    except models.Unavailable as e:
        clip_net, unavailable["clip_score"] = None, str(e)
    clip_size = clip_net.image_size if clip_net is not None else 224
    loader = DataLoader(PBESet(samples, clip_size), batch_size=batch_size, num_workers=workers)
    rows = score_samples(loader, clip_net, device)
    try:
        fid = {"available": True, "n": len(files), "n_reference": len(fid_files),
               "value": folder_fid(models.build_inception(inception_weights).to(device), files, fid_files,
                                   size, batch_size, workers, device)}
    except models.Unavailable as e:
        fid = report.unavailable(str(e))
    entry = {k: report.unavailable(unavailable[k]) if k in unavailable else report.stats(r[k] for r in rows)
             for k in PER_IMAGE} | {"fid": fid}
    warnings_ = []
    if any(r["resized"] for r in rows):
        warnings_.append(f"{sum(r['resized'] for r in rows)} sources or masks were resized to their result's size")
    if clip_net is not None and entry["clip_score"]["n"] < len(rows):
        warnings_.append(f"{len(rows) - entry['clip_score']['n']} masks are empty: no CLIP score for them")
    summary = {
        "config": {"task": "pbe", "results": printable(results), "sources": printable(sources),
                   "masks": printable(masks), "references": printable(references),
                   "fid_reference": printable(fid_reference or sources), "clip": printable(clip or ""),
                   "size": size, "clip_size": clip_size, "n_images": len(rows), "device": str(device)},
        "metrics": entry, "definitions": DEFINITIONS, "warnings": warnings_,
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report.write_outputs(out, {
        "per_image.csv": report.csv_text(rows, ["image", "hole_fraction", *PER_IMAGE]),
        "summary.md": markdown(summary), "summary.json": report.json_text(summary)})
    return summary
