#!/usr/bin/env python
"""Tiled vs untiled decode agreement (PSNR, dB, [-1, 1] range) for each GroupNorm statistics mode.

    python benchmarks/tiled_accuracy.py --variant base --size 256 --tile 16 --overlap 4

Random-init weights (`perturb_`, as benchmarks/tiled_memory.py), inputs as there: smooth image,
a rectangular hole, batch 1, fp32, under `inference_mode`. Per row: image + mask or plain decode,
`Tiling(..., stats=...)`, PSNR against the untiled decode, wall time of that one decode, and its
FLOPs relative to the per-tile decode (torch's FlopCounterMode on a meta-device copy, so the
ratio does not depend on the machine's load, unlike the times).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import benchmarks / ldm_asym from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from benchmarks.harness import VARIANTS, perturb_  # noqa: E402
from ldm_asym.models import AsymmetricAutoencoder, Tiling  # noqa: E402
from ldm_asym.models.tiling import STATS_MODES  # noqa: E402


def _flops(model, z, image, mask, tile) -> int:
    with torch.device("meta"):
        meta = AsymmetricAutoencoder(**model.config()).eval()
    args = [torch.empty_like(t, device="meta") if t is not None else None for t in (z, image, mask)]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        meta.decode(*args, check_inputs=False, tile=tile)
    return counter.get_total_flops()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="base", choices=list(VARIANTS))
    p.add_argument("--size", type=int, default=256, help="image side, pixels")
    p.add_argument("--tile", type=int, default=16, help="tile side, latent pixels")
    p.add_argument("--overlap", type=int, default=4, help="latent pixels")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count (slow for stats=image)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    s, seed = args.size, args.seed
    torch.manual_seed(seed)
    variant = VARIANTS[args.variant]
    model = perturb_(AsymmetricAutoencoder(vae_config=variant["vae_config"],
                                           decoder={**variant["decoder"], "blend": "add"}), seed).eval()
    g = torch.Generator().manual_seed(seed + 1)
    coarse = torch.rand(1, 3, s // 32, s // 32, generator=g) * 2 - 1
    image = F.interpolate(coarse, size=(s, s), mode="bilinear", align_corners=False)
    mask = torch.zeros(1, 1, s, s)
    mask[..., s // 4: s // 2, s // 3: 3 * s // 4] = 1
    z = torch.randn(1, model.latent_channels, s // 8, s // 8, generator=g)
    print(f"{args.variant}, {s}², tile {args.tile}/{args.overlap}, {args.threads} threads, seed {seed}")
    print("| input | stats | PSNR vs untiled dB | time s | FLOPs vs stats=tile |\n|---|---|---|---|---|")
    for cond, (im, mk) in (("image + mask", (image, mask)), ("plain", (None, None))):
        with torch.inference_mode():
            t0 = time.perf_counter()
            full = model.decode(z, im, mk)
            print(f"| {cond} | untiled | – | {time.perf_counter() - t0:.1f} | – |", flush=True)
            base_flops = None if args.no_flops else _flops(model, z, im, mk, Tiling(args.tile, args.overlap, "tile"))
            for stats in reversed(STATS_MODES):
                tile = Tiling(args.tile, args.overlap, stats)
                t0 = time.perf_counter()
                out = model.decode(z, im, mk, tile=tile)
                seconds = time.perf_counter() - t0
                db = float(10 * torch.log10(4 / F.mse_loss(out, full)))
                ratio = "–" if args.no_flops else f"{_flops(model, z, im, mk, tile) / base_flops:.1f}×"
                print(f"| {cond} | {stats} | {db:.1f} | {seconds:.1f} | {ratio} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
