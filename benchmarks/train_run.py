"""A short Lightning training run built from a project config, timed before and after the GAN starts.

`scripts/gpu_check.py` takes its training figures from here. Model and data come from the YAML
configs through `instantiate_from_config` (the classes `main.py` trains), with the changes a
machine without SD weights, ImageNet or LPIPS' VGG trunk needs (`synthetic_config`). The Trainer
is built here, with no logger, checkpoints or validation, plus `StepTimer`.
"""

from __future__ import annotations

import gc
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from benchmarks.harness import _proc_status, _reset_peak_rss

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def synthetic_config(name: str, size: int, steps: int, disc_start: int, *, batch: int | None = None,
                     checkpointing: bool = False, channels_last: bool = True, compile: bool = True,
                     num_workers: int = 4, decoder: dict | None = None, vae_config: dict | None = None) -> dict:
    """configs/<name>.yaml as a plain dict, runnable anywhere: random frozen encoder (no SD VAE),
    random LPIPS trunk (same compute as VGG's, no download), scikit-image photos at `size`.

    `decoder` / `vae_config` replace the config's sizes (the CPU smoke run's toy widths);
    `batch` defaults to the config's per-GPU batch.
    """
    from omegaconf import OmegaConf

    from ldm_asym.cli import load_config

    cfg = OmegaConf.to_container(load_config(CONFIGS / f"{name}.yaml"), resolve=False)
    params = cfg["model"]["params"]
    params.update(vae_source=None, init_decoder_from_vae=False, channels_last=channels_last, compile=compile,
                  # full lr within a few steps, so the finite-loss check sees real updates
                  warmup_steps=max(1, disc_start // 3))
    if vae_config is not None:
        params["autoencoder"]["vae_config"] = vae_config
    dec = params["autoencoder"]["decoder"]["params"]
    dec.update(decoder or {}, gradient_checkpointing=checkpointing)
    params["loss"]["params"].update(disc_start=disc_start, lpips_pretrained=False)
    batch = batch or cfg["data"]["params"]["batch_size"]
    # Enough crops that no epoch ends inside the timed steps.
    train = {"target": "ldm_asym.data.SkimageDataset",
             "params": {"split": "train", "size": size, "n_crops": (steps + 2) * batch, "crop_min": 0.5,
                        "masks": {"preset": "train", "p_full": 0.5}}}
    cfg["data"] = {"target": cfg["data"]["target"],  # the config's DataModule
                   "params": {"batch_size": batch, "num_workers": num_workers, "train": train, "validation": None}}
    cfg.pop("paths", None)  # only the dropped SD VAE / ImageNet paths referred to them
    cfg.pop("lightning", None)  # the Trainer is built in `train_run`
    return cfg


def windows(steps: int, disc_start: int, warmup: int) -> dict[str, tuple[int, int]]:
    """Steps [a, b) (0-based) to time: before the GAN starts, and after it, each without its first
    `warmup` steps (torch.compile's compilation, cuDNN autotuning, optimiser state; at `disc_start` the
    discriminator joins the generator's loss and its own step starts)."""
    if not 0 < warmup < disc_start or disc_start + warmup >= steps:
        raise ValueError(f"need 0 < warmup ({warmup}) < disc_start ({disc_start}) and "
                         f"disc_start + warmup < steps ({steps})")
    return {"before_gan": (warmup, disc_start), "after_gan": (disc_start + warmup, steps)}


class StepTimer(pl.Callback):
    """Images/s in each window, peak memory, and whether every loss was finite.

    The clock is read at the end of batch a and of batch b (so a window holds batches a+1..b, data
    loading included); the device is synchronised there and nowhere else. Every loss that goes
    through `manual_backward` (generator and discriminator) is checked on the device with a
    running `&`, read once at the end: no host sync per step, and no reliance on what the module
    logs or when.
    """

    def __init__(self, windows: dict[str, tuple[int, int]], batch_size: int):
        self.windows, self.batch_size = windows, batch_size
        self.batches, self.losses_seen = 0, 0
        self.t0: dict[str, float] = {}
        self.img_s: dict[str, float] = {}
        self.loss_ok: torch.Tensor | None = None  # device tensor
        self.start = self.first_batch_s = None

    @staticmethod
    def _clock(device: torch.device) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def on_train_start(self, trainer, pl_module):
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        else:
            _reset_peak_rss()
        self.start = self._clock(pl_module.device)

    def on_before_backward(self, trainer, pl_module, loss):
        ok = torch.isfinite(loss.detach()).all()
        self.loss_ok = ok if self.loss_ok is None else self.loss_ok & ok
        self.losses_seen += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches += 1
        n = self.batches
        if n != 1 and not any(n in w for w in self.windows.values()):
            return
        now = self._clock(pl_module.device)
        if n == 1:
            self.first_batch_s = now - self.start  # includes compilation
        for name, (a, b) in self.windows.items():
            if n == a:
                self.t0[name] = now
            elif n == b and name in self.t0:
                self.img_s[name] = (b - a) * self.batch_size / (now - self.t0[name])


def train_run(cfg: dict, steps: int, disc_start: int, warmup: int, *, accelerator: str, precision: str,
              seed: int = 0) -> dict[str, Any]:
    """Train `cfg` (from `synthetic_config`) for `steps` steps; images/s before and after the GAN start."""
    from ldm_asym.util import instantiate_from_config

    torch._dynamo.reset()  # a fresh compile per run (dynamo's cache is per code object, with a limit)
    torch.manual_seed(seed)
    batch = cfg["data"]["params"]["batch_size"]
    timer = StepTimer(windows(steps, disc_start, warmup), batch)
    model = instantiate_from_config(cfg["model"])
    data = instantiate_from_config(cfg["data"])
    trainer = pl.Trainer(
        accelerator=accelerator, devices=1, precision=precision, max_steps=steps, logger=False,
        enable_checkpointing=False, limit_val_batches=0, use_distributed_sampler=False, callbacks=[timer],
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        # The module logs (and reads its device-side counters) only at logging steps: once, at the end.
        log_every_n_steps=steps, benchmark=accelerator == "cuda",
    )
    t0 = time.perf_counter()
    with warnings.catch_warnings():  # the module logs for a logger; here there is none, on purpose
        warnings.filterwarnings("ignore", message=".*but have no logger configured.*")
        trainer.fit(model, datamodule=data)
    wall = time.perf_counter() - t0
    device = model.device
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device) / 2**20, "CUDA max_memory_allocated (MB)"
    else:
        peak, kind = _proc_status("VmHWM"), "CPU peak RSS during training (MB)"
    weights_ok = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    skipped = trainer.callback_metrics.get("train/nonfinite_skipped")
    skipped = int(skipped) if skipped is not None else 0
    loss_ok = bool(timer.loss_ok) if timer.loss_ok is not None else None
    out = {
        "batch": batch, "steps": int(trainer.global_step), "batches": timer.batches, "disc_start": disc_start,
        "windows": {k: list(v) for k, v in timer.windows.items()},
        "img_s_before_gan": timer.img_s.get("before_gan"), "img_s_after_gan": timer.img_s.get("after_gan"),
        "peak_mem_mb": peak, "peak_mem_kind": kind,
        "loss_finite": bool(loss_ok and weights_ok and not skipped), "losses_seen": timer.losses_seen,
        "losses_finite": loss_ok, "weights_finite": weights_ok, "nonfinite_skipped": skipped,
        "first_batch_s": timer.first_batch_s, "wall_s": wall,
    }
    del trainer, model, data, timer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out
