"""Evaluation outputs: statistics, CSV, Markdown tables, image grids; every file written atomically.

Nothing here knows a task: the tasks name their columns and table rows. A metric that could not be
computed is `{"available": False, "reason": ...}` everywhere, never dropped.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from ldm_asym.eval.data import printable
from ldm_asym.util import atomic_write


def stats(values: Iterable[float]) -> dict:
    """{available, mean, std, n} over the finite values (n counts them; NaN = an empty region)."""
    v = np.asarray(list(values), dtype=np.float64)
    ok = v[np.isfinite(v)]
    return {"available": True, "mean": float(ok.mean()) if ok.size else math.nan,
            "std": float(ok.std()) if ok.size else math.nan, "n": int(ok.size)}


def unavailable(reason: str) -> dict:
    return {"available": False, "reason": reason}


def no_nan(obj):
    """NaN (a region empty in every image) -> null, so summary.json stays strict JSON."""
    if isinstance(obj, dict):
        return {k: no_nan(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [no_nan(v) for v in obj]
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj


def json_text(summary: dict) -> str:
    return json.dumps(no_nan(summary), indent=2, allow_nan=False) + "\n"


def _fmt(v) -> str:
    return "" if v is None else f"{v:.6g}"


def csv_text(rows: list[dict], columns: Sequence[str], text_columns: Sequence[str] = ("image",)) -> str:
    """One line per row; `text_columns` as (printable) text, the rest as numbers: empty = unavailable, 'nan' = empty region."""
    f = io.StringIO(newline="")
    w = csv.writer(f)
    w.writerow(columns)
    for r in rows:
        w.writerow([printable(str(r.get(c, ""))) if c in text_columns else _fmt(r.get(c)) for c in columns])
    return f.getvalue()


def write_text(path: str | os.PathLike, text: str) -> None:
    """UTF-8 `text` to `path`, atomically (a crash leaves the old file or none, never half of one)."""
    with atomic_write(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)


def write_outputs(out: str | os.PathLike, texts: Mapping[str, str]) -> None:
    """Write `texts` ({file name: text}) into `out`, in order: put summary.json (what says "this run finished") last.

    Callers render every text before calling this, so a failure while rendering leaves no file.
    """
    for name, text in texts.items():
        write_text(Path(out) / name, text)


def cell(entry: dict) -> str:
    """A table cell: the mean (or value) to 4 significant digits, or n/a."""
    return "n/a" if not entry["available"] else f"{entry.get('mean', entry.get('value')):.4g}"


def table(columns: Sequence[tuple[str, str]], rows: Mapping[str, Mapping[str, dict]], first: str) -> list[str]:
    """Markdown table lines: one row per entry of `rows`, one column per (header, key) of `columns`."""
    lines = [f"| {first} | " + " | ".join(h for h, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, entry in rows.items():
        lines.append(f"| {name} | " + " | ".join(cell(entry[k]) for _, k in columns) + " |")
    return lines


def notes_lines(entries: Iterable[Mapping[str, dict]], warnings: Sequence[str],
                definitions: Mapping[str, str]) -> list[str]:
    """Unavailable metrics with their reasons, notes, warnings, then the definitions."""
    entries = list(entries)
    reasons = {k: e["reason"] for entry in entries for k, e in entry.items() if not e["available"]}
    notes = {k: e["note"] for entry in entries for k, e in entry.items() if e.get("note")}
    lines = [""] + [f"- **{k}** unavailable: {r}" for k, r in reasons.items()]
    lines += [f"- **{k}**: {n}" for k, n in notes.items()]
    lines += [f"- warning: {w}" for w in warnings]
    return lines + ["", "Definitions:", ""] + [f"- `{k}`: {v}" for k, v in definitions.items()]


# ---------------------------------------------------------------------- grids
def to_u8_hwc(x: torch.Tensor) -> np.ndarray:
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


def write_grid(path: Path, panels: list[tuple[str, np.ndarray]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as f:
        grid_image(panels).save(f, format="PNG")
