"""Command line of `scripts/benchmark.py`: sweeps configurations through the harness, prints tables."""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks.data import data_benchmark
from benchmarks.harness import (DTYPES, VARIANTS, Config, keeps_torch_threads, loadavg, machine_info, run_config,
                                write_json)


def _fmt(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def table(results: list[dict]) -> str:
    """Markdown table of the decode / training / memory / accuracy results."""
    head = ("| configuration | ours ms | diffusers ms | speedup | train img/s ours / diffusers | "
            "peak MB ours / diffusers | max abs diff | PSNR dB |")
    lines = [head, "|" + "---|" * 8]
    for r in results:
        lines.append(
            f"| {r['label']} | {_fmt(r['ours_ms'], '.1f')} | {_fmt(r['reference_ms'], '.1f')} | "
            f"{_fmt(r['speedup'], '.3f')} | {_fmt(r['train_img_s'], '.3g')} / {_fmt(r['reference_train_img_s'], '.3g')} | "
            f"{_fmt(r['peak_mem_mb'], '.0f')} / {_fmt(r['reference_peak_mem_mb'], '.0f')} | "
            f"{_fmt(r['max_abs_diff'], '.2e')} | {_fmt(r['psnr_db'], '.1f')} |"
        )
    return "\n".join(lines)


def data_table(data: dict) -> str:
    shards = any("shards" in g for g in data["groups"].values())
    head = "| JPEGs | kpx | bits/px | images/s per worker | decode ms | crop+resize ms | to tensor ms | mask ms |"
    if shards:
        head += " shards: images/s per worker | DataLoader img/s, folder / shards |"
    lines = [head, "|" + "---|" * (10 if shards else 8)]
    for name, g in data["groups"].items():
        s = g["stage_ms"]
        row = (f"| {name} | {g['pixels'] / 1e3:.0f} | {g['bits_per_pixel']} | {g['img_s_per_worker']:.0f} | "
               f"{s['decode']:.2f} | {s['crop_resize']:.2f} | {s['to_tensor']:.2f} | {s['mask']:.2f} |")
        if shards:
            sh = g["shards"]
            loader = (f"{g['loader_img_s']:.0f} / {sh['loader_img_s']:.0f} ({g['loader_workers']} workers)"
                      if "loader_img_s" in sh else "-")
            row += f" {sh['img_s_per_worker']:.0f} | {loader} |"
        lines.append(row)
    return "\n".join(lines)


# ---------------------------------------------------------------------- CLI
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scripts/benchmark.py",
        description="Our asymmetric decoder vs diffusers' AsymmetricAutoencoderKL (same weights): decode "
                    "latency, training step, peak memory, output difference; optionally data loading.",
    )
    p.add_argument("--variant", nargs="+", default=["tiny"], choices=list(VARIANTS))
    p.add_argument("--size", nargs="+", type=int, default=[256], help="image side (multiple of 8)")
    p.add_argument("--batch", nargs="+", type=int, default=[1])
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", nargs="+", default=["fp32"], choices=list(DTYPES),
                   help="bf16 = torch.autocast(bf16) for ours and diffusers alike")
    p.add_argument("--channels-last", action="store_true", help="ours: NHWC model, loss nets and inputs")
    p.add_argument("--compile", action="store_true", help="ours: torch.compile decoder, LPIPS and discriminator in place")
    p.add_argument("--checkpointing", action="store_true", help="ours: gradient checkpointing of the decoder")
    p.add_argument("--no-fast", action="store_true",
                   help="ours: diffusers' block forwards instead of the decoder's fast paths (A/B runs)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5, help="interleaved timed repeats per model (median)")
    p.add_argument("--no-train", action="store_true", help="skip the training-step benchmark")
    p.add_argument("--no-memory", action="store_true", help="skip peak memory (CPU: the subprocesses)")
    p.add_argument("--memory-only", action="store_true",
                   help="only the output difference and peak memory (no timing): e.g. large batches")
    p.add_argument("--tf32", action="store_true", help="CUDA fp32: allow TF32 (off by default: equal outputs)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", nargs="?", const="", default=None, metavar="DIR",
                   help="data-loading benchmark on the JPEGs in DIR; without DIR, ImageNet-sized JPEGs "
                        "(500x375, 1024x768) are generated into a temporary folder")
    p.add_argument("--data-only", action="store_true", help="run only the data-loading benchmark")
    p.add_argument("--data-size", type=int, default=256)
    p.add_argument("--data-images", type=int, default=16, help="generated JPEGs per size")
    p.add_argument("--data-workers", type=int, default=0, help="also time a DataLoader with N workers")
    p.add_argument("--data-shards", action="store_true",
                   help="also time the same JPEGs as litdata shards (ShardDataset, scripts/make_shards.py)")
    p.add_argument("--photos", default=str(Path(__file__).resolve().parents[1] / ".." / "shared" / "data" /
                                           "inpainting_examples"),
                   help="real photos to re-encode as JPEGs for --data (synthetic content if missing)")
    p.add_argument("--json", default=None, metavar="FILE", help="write all results here")
    return p.parse_args(argv)


@keeps_torch_threads
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    report: dict[str, Any] = {
        "machine": machine_info(args.device),
        "command": " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else list(argv))),
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "results": [],
    }
    report["torch"] = report["machine"]["torch"]
    if not args.data_only:
        for variant, size, batch, dtype in itertools.product(args.variant, args.size, args.batch, args.dtype):
            if size % 8:
                raise SystemExit(f"--size {size} is not a multiple of 8")
            cfg = Config(variant=variant, size=size, batch=batch, device=args.device, dtype=dtype,
                         channels_last=args.channels_last, compile=args.compile,
                         checkpointing=args.checkpointing, fast=not args.no_fast, warmup=args.warmup,
                         repeats=args.repeats, train=not args.no_train,
                         memory=args.memory_only or not args.no_memory, timing=not args.memory_only,
                         tf32=args.tf32, seed=args.seed)
            report["results"].append(run_config(cfg, log))
            if args.json:  # keep what is done if a later configuration fails
                write_json(args.json, report)
        if report["results"]:
            print(table(report["results"]))
    if args.data is not None or args.data_only:
        root = args.data or None
        report["data"] = data_benchmark(root, size=args.data_size, photos=args.photos,
                                        per_size=args.data_images, workers=args.data_workers,
                                        seed=args.seed, shards=args.data_shards, log=log)
        print()
        print(data_table(report["data"]))
    report["machine"]["loadavg_end"] = loadavg()
    if args.json:
        write_json(args.json, report)
    return 0
