"""scripts/plot_curves.py: validation curves from CSVLogger and TensorBoard runs -> PNG + CSV."""

import csv

import pytest
from PIL import Image

from ldm_asym.curves import read_curves

ROWS = [(9, 30.0, 20.0, 1e-3), (19, 33.5, 20.5, 4e-4), (29, 36.0, 20.7, 2e-4)]


def _csv_run(folder):
    folder.mkdir()
    with open(folder / "metrics.csv", "w", newline="") as f:  # CSVLogger's layout: train and val rows mixed
        w = csv.writer(f)
        w.writerow(["epoch", "step", "loss/l1", "val/psnr_known", "val/psnr_hole", "val/unmasked_error"])
        for step, known, hole, err in ROWS:
            w.writerow([0, step, 0.1, "", "", ""])
            w.writerow([0, step, "", known, hole, err])
    return folder


def _tb_run(folder):
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(folder)) as w:
        for step, known, hole, err in ROWS:
            w.add_scalar("val/psnr_known", known + 1, step)
            w.add_scalar("val/psnr_hole", hole, step)
            w.add_scalar("val/unmasked_error", err / 2, step)
    return folder


def test_both_loggers_read_and_plotted_side_by_side(tmp_path):
    from scripts.plot_curves import main

    a, b = _csv_run(tmp_path / "a"), _tb_run(tmp_path / "b")
    assert read_curves(a)["val/psnr_known"] == [(9, 30.0), (19, 33.5), (29, 36.0)]
    assert read_curves(b)["val/unmasked_error"] == [(s, pytest.approx(e / 2)) for s, _, _, e in ROWS]
    assert main([str(a), str(b), "--out", str(tmp_path / "c.png"), "--names", "paper", "fast"]) == 0
    assert Image.open(tmp_path / "c.png").size[0] > 600
    rows = list(csv.DictReader(open(tmp_path / "c.csv")))
    assert len(rows) == 2 * 3 * 3 and {r["run"] for r in rows} == {"paper", "fast"}
    assert float(next(r for r in rows if r["run"] == "fast" and r["metric"] == "val/psnr_known"
                      and r["step"] == "29")["value"]) == 37.0


def test_runs_without_curves_are_named(tmp_path, capsys):
    from scripts.plot_curves import main

    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        main([str(tmp_path / "empty"), "--out", str(tmp_path / "x.png")])
    assert "no metrics.csv" in capsys.readouterr().err
    run = tmp_path / "noval"
    run.mkdir()
    (run / "metrics.csv").write_text("epoch,step,loss/l1\n0,1,0.5\n")
    with pytest.raises(ValueError, match="no validation has run yet"):
        read_curves(run)
    assert not (tmp_path / "x.png").exists()
