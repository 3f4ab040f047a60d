#!/usr/bin/env python
"""CPU peak memory and time of tiled vs untiled decoding (image + mask), one fresh process each.

    python benchmarks/tiled_memory.py --variant base --size 1024 2048 --tile 64 --overlap 16 \
        --json docs/benchmarks/cpu_tiled_decode.json

Memory: each measurement runs in its own subprocess; after the model and inputs are built, the
process' RSS high-water mark (VmHWM) is reset to its current RSS (/proc/self/clear_refs) and one
decode runs under `inference_mode`: `peak` is VmHWM after it, `rise` the peak minus the RSS just
before. Why this and not tracemalloc: tracemalloc sees only allocations through Python's own
allocator, while torch's CPU tensors come from c10's allocator (posix_memalign), invisible to it;
torch has no CPU counterpart of `cuda.max_memory_allocated`. The kernel's high-water mark counts
every resident byte. ru_maxrss would too, but cannot be reset, so it would include model building;
it is the fallback where /proc is missing. glibc is told to return freed blocks >= 64 KiB to the
OS at once (MALLOC_MMAP_THRESHOLD_), so RSS follows live memory rather than malloc's cache.

Time: wall time of that one decode (no warm-up: a decode takes minutes here, oneDNN's per-shape
setup is noise on that scale). Untiled decodes whose time or memory, extrapolated linearly in pixels
from the largest untiled size measured, exceed --untiled-max-s or the free memory are reported, not
run. PSNR (dB, [-1, 1] range) is tiled vs untiled where both ran, random-init weights.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):  # run as a script: import benchmarks / ldm_asym from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.harness import (REPO_ROOT, VARIANTS, _proc_status, _reset_peak_rss, loadavg,  # noqa: E402
                                machine_info, perturb_, write_json)


def probe(spec: dict) -> dict:
    """One measurement (meant for a fresh process): build, reset the RSS mark, decode once."""
    from ldm_asym.models import AsymmetricAutoencoder, Tiling
    from ldm_asym.models.tiling import tile_starts

    torch.set_num_threads(spec["threads"])
    variant, s, seed = VARIANTS[spec["variant"]], spec["size"], spec["seed"]
    torch.manual_seed(seed)
    model = perturb_(AsymmetricAutoencoder(vae_config=variant["vae_config"],
                                           decoder={**variant["decoder"], "blend": "add"}), seed).eval()
    g = torch.Generator().manual_seed(seed + 1)
    coarse = torch.rand(1, 3, s // 32, s // 32, generator=g) * 2 - 1  # smooth content, a rectangular hole
    image = torch.nn.functional.interpolate(coarse, size=(s, s), mode="bilinear", align_corners=False)
    mask = torch.zeros(1, 1, s, s)
    mask[..., s // 4: s // 2, s // 3: 3 * s // 4] = 1
    z = torch.randn(1, model.latent_channels, s // 8, s // 8, generator=g)
    tile = Tiling(spec["tile"], spec["overlap"]) if spec["tile"] else None
    n_tiles = len(tile_starts(s // 8, tile.size, tile.overlap)) ** 2 if tile and not tile.fits(s // 8, s // 8) else 1

    exact = _reset_peak_rss()
    before = _proc_status("VmRSS")
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.decode(z, image=image, mask=mask, check_inputs=False, tile=tile)
    seconds = time.perf_counter() - t0
    peak = _proc_status("VmHWM")
    if peak is None or before is None:  # no /proc: ru_maxrss, the whole process' mark (KB on Linux)
        import resource

        peak, before, exact = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, float("nan"), False
    if spec.get("save"):
        torch.save(out.clone(), spec["save"])
    return {"seconds": seconds, "peak_mb": peak, "before_mb": before, "rise_mb": peak - before,
            "exact": exact, "tiles": n_tiles}


def run_subprocess(spec: dict, timeout: float = 3600) -> dict:
    """`probe(spec)` in a fresh Python process (RSS high-water marks are per process)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p))
    code = ("import json, sys; from benchmarks.tiled_memory import probe; "
            "print('@@RESULT@@' + json.dumps(probe(json.loads(sys.argv[1]))))")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], env=env, capture_output=True,
                          text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@RESULT@@")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"probe failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(lines[-1][len("@@RESULT@@"):])


def _mem_available_mb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            return next(int(ln.split()[1]) / 1024 for ln in f if ln.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(4 / torch.nn.functional.mse_loss(a, b)))


def table(rows: list[dict]) -> str:
    lines = ["| size | decode | tiles | time s | peak RSS MB | rise during decode MB | PSNR vs untiled dB |",
             "|" + "---|" * 7]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"| {r['size']}² | {r['label']} | – | not run: {r['skipped']} | – | – | – |")
            continue
        psnr = "–" if r.get("psnr_db") is None else f"{r['psnr_db']:.1f}"
        lines.append(f"| {r['size']}² | {r['label']} | {r['tiles']} | {r['seconds']:.1f} | {r['peak_mb']:.0f} | "
                     f"{r['rise_mb']:.0f} | {psnr} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks/tiled_memory.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="base", choices=list(VARIANTS))
    p.add_argument("--size", nargs="+", type=int, default=[1024, 2048], help="image sides (multiples of 8)")
    p.add_argument("--tile", type=int, default=64, help="latent tile size (64 = 512 px, diffusers' SD default)")
    p.add_argument("--overlap", type=int, default=16, help="latent overlap")
    p.add_argument("--untiled-max-s", type=float, default=180.0,
                   help="skip an untiled decode predicted to take longer than this")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="FILE")
    return p.parse_args(argv)


def main(argv=None, runner: Callable[[dict], dict] = run_subprocess) -> int:
    """`runner` measures one spec; tests pass `probe` to run in-process (memory then not isolated)."""
    args = parse_args(argv)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    report: dict[str, Any] = {"machine": machine_info("cpu"), "settings": vars(args), "results": []}
    rows = report["results"]
    last_untiled = None  # (pixels, seconds, rise MB, before MB) of the largest untiled decode run
    with tempfile.TemporaryDirectory() as tmp:
        for size in sorted(args.size):
            if size % 8:
                raise SystemExit(f"--size {size} is not a multiple of 8")
            outs = {}
            for label, tile in (("untiled", 0), (f"tiled {args.tile}/{args.overlap}", args.tile)):
                row = {"size": size, "label": label}
                if not tile and last_untiled is not None:  # extrapolate before committing minutes and GBs
                    k = size * size / last_untiled[0]
                    secs, peak = last_untiled[1] * k, last_untiled[3] + last_untiled[2] * k
                    free = _mem_available_mb()
                    if secs > args.untiled_max_s or (free is not None and last_untiled[2] * k > 0.8 * free):
                        row["skipped"] = (f"predicted ~{secs:.0f} s, peak ~{peak / 1024:.1f} GB "
                                          f"(linear in pixels from {int(last_untiled[0] ** 0.5)}²)")
                        rows.append(row)
                        log(f"{size}² {label}: {row['skipped']}")
                        continue
                spec = {"variant": args.variant, "size": size, "tile": tile, "overlap": args.overlap,
                        "threads": args.threads, "seed": args.seed, "save": str(Path(tmp) / f"{size}_{tile}.pt")}
                log(f"{size}² {label} ...")
                row.update(runner(spec))
                outs[label] = torch.load(spec["save"])
                if not tile:
                    last_untiled = (size * size, row["seconds"], row["rise_mb"], row["before_mb"])
                elif "untiled" in outs:
                    row["psnr_db"] = _psnr(outs[label], outs["untiled"])
                rows.append(row)
                log(f"  {row['seconds']:.1f} s, peak {row['peak_mb']:.0f} MB, rise {row['rise_mb']:.0f} MB")
                if args.json:
                    write_json(args.json, report)
    report["machine"]["loadavg_end"] = loadavg()
    if args.json:
        write_json(args.json, report)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
