"""Text-to-image evaluation: FID and Inception Score of generated images (e.g. MSCOCO prompts).

The decoder's text-to-image mode (all-ones mask, no prior) must keep SD's quality: the paper
compares FID on MSCOCO (DESIGN §8: vanilla 19.88, 2x 19.68). Both folders are center-cropped to
squares and resized to --size; torchmetrics' Inception resizes to 299 itself.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ldm_asym.eval import models, report
from ldm_asym.eval.data import FolderSet, check_headers, list_images, printable
from ldm_asym.eval.inception import FIDSet, InceptionScoreSet

DEFINITIONS = {
    "fid": "Frechet Inception distance (torchmetrics, 2048-d pool features) between the generated images "
           "and the reference folder",
    "inception_score": "exp(E_x KL(p(y|x) || p(y))) of the generated images (torchmetrics, 1008 unbiased logits), "
                       "mean and std over --is-splits splits of a seeded shuffle",
}
TABLE = (("FID", "fid"), ("Inception Score", "inception_score"))


def markdown(summary: dict) -> str:
    cfg, entry = summary["config"], summary["metrics"]
    lines = ["# Text-to-image evaluation", "",
             f"{cfg['n_images']} generated images in `{cfg['results']}` against {cfg['n_reference']} in "
             f"`{cfg['fid_reference']}`, at {cfg['size']}².", ""]
    lines += report.table(TABLE, {"generated": entry}, "set")
    lines += report.notes_lines([entry], summary.get("warnings", []), DEFINITIONS)
    return "\n".join(lines) + "\n"


def evaluate_t2i(results: str, fid_reference: str, out: str, *, inception_weights: str | None = None,
                 size: int = 512, batch_size: int = 16, is_splits: int = 10, seed: int = 0,
                 device: str | None = None, workers: int = 0) -> dict:
    """FID and Inception Score of the images in `results`; writes `out/` (summary.json, summary.md)."""
    if batch_size < 1 or size < 16 or is_splits < 1:
        raise ValueError(f"--batch-size and --is-splits must be >= 1 and --size >= 16; "
                         f"got {batch_size}, {is_splits}, {size}")
    files = list_images(results, what="generated image", skip_masks=False)
    real = list_images(fid_reference, what="FID reference", skip_masks=False)
    check_headers(files + real)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    fid = score = None
    entry: dict[str, dict] = {}
    try:
        fid = FIDSet(models.build_inception(inception_weights).to(device), ["generated"]).to(device)
        score = InceptionScoreSet(models.build_inception(inception_weights, "logits_unbiased").to(device), is_splits)
    except models.Unavailable as e:
        entry = {"fid": report.unavailable(str(e)), "inception_score": report.unavailable(str(e))}
    if fid is not None:
        for b in DataLoader(FolderSet(real, size), batch_size=batch_size, num_workers=workers):
            fid.add_real(b["image"].to(device))
        for b in DataLoader(FolderSet(files, size), batch_size=batch_size, num_workers=workers):
            fid.add("generated", b["image"].to(device))
            score.add(b["image"])
        for key, compute in (("fid", lambda: {"value": fid.compute("generated"), "n": len(files)}),
                             ("inception_score", lambda: score.compute(seed))):
            try:
                entry[key] = {"available": True} | compute()
            except models.Unavailable as e:
                entry[key] = report.unavailable(str(e))
    summary = {
        "config": {"task": "t2i", "results": printable(results), "fid_reference": printable(fid_reference),
                   "n_images": len(files), "n_reference": len(real), "size": size, "seed": seed,
                   "device": str(device), "batch_size": batch_size},
        "metrics": entry, "definitions": DEFINITIONS, "warnings": [],
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report.write_outputs(out, {"summary.md": markdown(summary), "summary.json": report.json_text(summary)})
    return summary
