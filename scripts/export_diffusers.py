#!/usr/bin/env python
"""Export any checkpoint `load_autoencoder` reads to a diffusers folder.

blend add  -> AsymmetricAutoencoderKL folder (drop-in `vae` for StableDiffusionInpaintPipeline)
blend none -> AutoencoderKL folder; blend concat has no diffusers equivalent (clear error).

    python scripts/export_diffusers.py --ckpt logs/<run>/checkpoints/last.ckpt --out asym-vae
"""

import argparse
import sys

from ldm_asym.interop import export_diffusers, load_autoencoder


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="diffusers folder, SD/authors'/our checkpoint file, run folder or hub id")
    p.add_argument("--out", required=True, help="output folder (config.json + diffusion_pytorch_model.safetensors)")
    p.add_argument("--vae", default=None, help="take the frozen encoder from this source (decoder-only checkpoints)")
    p.add_argument("--ema", action="store_true", help="export the EMA decoder weights of a training checkpoint")
    p.add_argument("--scaling-factor", type=float, default=None, help="latent scaling, e.g. 0.13025 for SDXL")
    p.add_argument("--trust-pickle", action="store_true", help="allow legacy pickles that run code (trusted files only)")
    args = p.parse_args(argv)
    overrides = {} if args.scaling_factor is None else {"scaling_factor": args.scaling_factor}
    try:
        model = load_autoencoder(args.ckpt, vae=args.vae, use_ema=args.ema, trust_pickle=args.trust_pickle, **overrides)
        out = export_diffusers(model, args.out)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({model.blend} decoder, {sum(p.numel() for p in model.decoder.parameters()):,} decoder params)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
