"""Convergence curves of training runs: the validation metrics against steps, from a run folder.

A run logs `val/psnr_known`, `val/psnr_hole` and `val/unmasked_error` on its fixed validation set
(ldm_asym.train.module). Both loggers the configs use are read: CSVLogger's `<run>/metrics.csv`
and TensorBoardLogger's `<run>/events.out.tfevents.*`. scripts/plot_curves.py draws them.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

CURVES = {  # metric -> (axis label, log scale)
    "val/psnr_known": ("known-pixel PSNR (dB)", False),
    "val/psnr_hole": ("hole PSNR (dB)", False),
    "val/unmasked_error": ("unmasked error (known-pixel MSE)", True),
}


def read_curves(run: str | os.PathLike, metrics=tuple(CURVES)) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} sorted by step; the last value logged at a step wins."""
    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"run folder not found: {run}")
    found: dict[str, dict[int, float]] = {m: {} for m in metrics}
    csv_path = run / "metrics.csv"
    events = sorted(run.glob("events.out.tfevents.*"))
    if csv_path.is_file():
        with open(csv_path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                for m in metrics:
                    if row.get(m) not in (None, ""):
                        found[m][int(row["step"])] = float(row[m])
    elif events:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        for path in events:
            acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
            acc.Reload()
            for m in metrics:
                if m in acc.Tags().get("scalars", []):
                    found[m].update({e.step: e.value for e in acc.Scalars(m)})
    else:
        raise FileNotFoundError(f"{run} has no metrics.csv (CSVLogger) or events.out.tfevents.* (TensorBoardLogger)")
    curves = {m: sorted(v.items()) for m, v in found.items() if v}
    if not curves:
        raise ValueError(f"{run} logged none of {', '.join(metrics)}: no validation has run yet "
                         f"(lightning.trainer.val_check_interval, limit_val_batches)")
    return curves


def write_csv(path: str | os.PathLike, runs: dict[str, dict[str, list[tuple[int, float]]]]) -> None:
    """Long format: run, metric, step, value (one row per logged point)."""
    from ldm_asym.util import atomic_write

    with atomic_write(path, newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "metric", "step", "value"])
        for name, curves in runs.items():
            for metric, points in curves.items():
                w.writerows([name, metric, step, f"{value:.6g}"] for step, value in points)


def plot(path: str | os.PathLike, runs: dict[str, dict[str, list[tuple[int, float]]]], title: str = "") -> None:
    """One panel per metric, every run as a line in each (side by side against steps)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on training nodes
    import matplotlib.pyplot as plt

    from ldm_asym.util import atomic_write

    metrics = [m for m in CURVES if any(m in c for c in runs.values())]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.8 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        label, log = CURVES[metric]
        for name, curves in runs.items():
            points = [(s, v) for s, v in curves.get(metric, []) if math.isfinite(v)]
            if points:
                ax.plot(*zip(*points), marker=".", label=name)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.set_yscale("log" if log else "linear")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
