"""The VAEs under evaluation: which baseline a run started from, and the three decodings compared.

Per image and mask, one set of latents (posterior mode of the evaluated model's frozen encoder)
is decoded three ways:

* ``vanilla``: the baseline's plain decoder (no image, no mask);
* ``paste``: vanilla with the known pixels pasted back, ``mask·vanilla + (1 - mask)·image``
  (binary mask) -- the naive fix the paper argues against: its unmasked error is 0 by
  construction, the seam it leaves shows in the boundary-band metrics;
* ``ours``: the evaluated decoder given the image and the mask (1 = hole).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ldm_asym import metrics as M

DECODERS = ("vanilla", "paste", "ours")


def run_dir(ckpt: Path) -> Path | None:
    """The training run folder `ckpt` is or belongs to (holding checkpoints/last.ckpt), else None."""
    if ckpt.is_dir() and (ckpt / "checkpoints" / "last.ckpt").is_file():
        return ckpt
    if ckpt.is_file() and ckpt.parent.name == "checkpoints":
        return ckpt.parent.parent
    return None


def default_baseline(ckpt: str | os.PathLike, trust_pickle: bool = False) -> tuple[str, str]:
    """The SD VAE a training run started from (its `vae_source`) -> (source, where it was read).

    Read from `<run>/configs/*-project.yaml` (`model.params.vae_source`), else from the checkpoint's
    `hyper_parameters`. Anything else (diffusers folders, SD / authors' files) has no such record:
    ValueError asking for --baseline.
    """
    path = Path(ckpt)
    ask = "pass --baseline with the SD VAE whose vanilla decoder to compare against"
    run = run_dir(path)
    found: tuple[object, str] | None = None
    if run is not None:
        from omegaconf import OmegaConf

        for cfg_file in sorted((run / "configs").glob("*-project.yaml"), reverse=True):
            cfg = OmegaConf.load(cfg_file)
            if OmegaConf.select(cfg, "model.params") is not None and "vae_source" in cfg.model.params:
                found = (OmegaConf.select(cfg, "model.params.vae_source"), str(cfg_file))
                break
    ckpt_file = path / "checkpoints" / "last.ckpt" if path.is_dir() else path
    if found is None and ckpt_file.is_file() and ckpt_file.suffix == ".ckpt":
        from ldm_asym.interop import read_checkpoint

        try:
            hp = read_checkpoint(ckpt_file, trust_pickle).get("hyper_parameters") or {}
        except ValueError as e:
            raise ValueError(f"cannot read the baseline from {ckpt_file} ({e}); {ask}") from e
        if "vae_source" in hp:
            found = (hp["vae_source"], f"{ckpt_file} hyper_parameters")
    if found is None:
        raise ValueError(f"{ckpt} is not one of our training checkpoints / run folders (no vae_source "
                         f"recorded), so there is no default baseline; {ask}")
    source, where = found
    if source is None:
        raise ValueError(f"{ckpt} was trained with vae_source: null (a random frozen encoder, per {where}), "
                         f"so it has no vanilla counterpart; {ask}")
    from ldm_asym.interop import HUB_ID

    if not Path(str(source)).exists() and not HUB_ID.match(str(source)):
        raise FileNotFoundError(f"the training run's vae_source {source} (from {where}) does not exist here; {ask}")
    return str(source), where


def compare_encoders(a: torch.nn.Module, b: torch.nn.Module) -> str | None:
    """None if both have identical encoder and quant_conv tensors, else what differs."""
    def frozen(m):
        return {k: v for k, v in m.state_dict().items() if k.startswith(("encoder.", "quant_conv."))}

    fa, fb = frozen(a), frozen(b)
    if set(fa) != set(fb):
        return f"different architectures ({len(set(fa) ^ set(fb))} tensors exist in only one)"
    diff = [k for k in fa if fa[k].shape != fb[k].shape or not torch.equal(fa[k].cpu(), fb[k].cpu())]
    return f"{len(diff)} of {len(fa)} tensors differ (first: {diff[0]})" if diff else None


class Reconstructor:
    """image, mask -> {"vanilla", "paste", "ours"}, all from one encoding (see the module doc)."""

    def __init__(self, model, baseline, shared_latents: bool = True):
        self.model, self.baseline, self.shared = model, baseline, shared_latents

    @torch.no_grad()
    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        hole = M.hole_region(mask)
        z = self.model.encode(image).mode()
        zb = z if self.shared else self.baseline.encode(image).mode()
        vanilla = self.baseline.decode(zb).clamp(-1, 1)
        return {
            "vanilla": vanilla,
            "paste": hole * vanilla + (1 - hole) * image,
            "ours": self.model.decode(z, image=image, mask=hole).clamp(-1, 1),
        }
