#!/usr/bin/env python
"""Convergence curves of one or more runs side by side: known-pixel PSNR, hole PSNR and unmasked
error on the fixed validation set, against steps -> a PNG and a CSV.

    python scripts/plot_curves.py logs/<run_a> logs/<run_b> --out curves.png      # + curves.csv
    python scripts/plot_curves.py logs/a logs/b --names paper fast_start --title "demo, seed 0"
"""

import argparse
import sys
from pathlib import Path

from ldm_asym.curves import plot, read_curves, write_csv


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders (logs/<time>_<name>) with metrics.csv or TensorBoard events")
    p.add_argument("--out", default="curves.png", help="PNG to write; the CSV goes beside it (default curves.png)")
    p.add_argument("--names", nargs="+", help="legend names, one per run (default: the folder names)")
    p.add_argument("--title", default="")
    args = p.parse_args(argv)
    if args.names and len(args.names) != len(args.runs):
        p.error(f"--names gives {len(args.names)} names for {len(args.runs)} runs")
    names = args.names or [Path(r).name for r in args.runs]
    try:
        runs = {name: read_curves(run) for name, run in zip(names, args.runs)}
    except (FileNotFoundError, ValueError) as e:
        p.exit(2, f"plot_curves.py: error: {e}\n")
    out = Path(args.out)
    plot(out, runs, args.title)
    write_csv(out.with_suffix(".csv"), runs)
    print(f"wrote {out} and {out.with_suffix('.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
