"""Callbacks: image grids, checkpoints on SIGUSR1 / exception, run-folder setup."""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

import pytorch_lightning as pl
import torch
import torchvision
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger
from pytorch_lightning.utilities import rank_zero_only

log = logging.getLogger(__name__)


def comparison_grid(x: torch.Tensor, mask: torch.Tensor, rec: torch.Tensor, max_images: int = 4) -> torch.Tensor:
    """Rows: input, mask, masked input, reconstruction, |diff| (x3 for visibility). Values in [0, 1]."""
    n = min(max_images, x.shape[0])
    x, mask, rec = x[:n].float().cpu(), mask[:n].float().cpu(), rec[:n].float().cpu().clamp(-1, 1)
    to01 = lambda t: (t.clamp(-1, 1) + 1) / 2  # noqa: E731
    rows = [to01(x), mask.expand(-1, 3, -1, -1), to01((1 - mask) * x), to01(rec),
            ((x - rec).abs() * 1.5).clamp(0, 1)]
    return torchvision.utils.make_grid(torch.cat(rows), nrow=n, padding=2, pad_value=1.0)


class ImageLogger(pl.Callback):
    """Every `every_n_steps` training steps, and after each validation, save a comparison grid to
    `<run>/images/{train,val}/` and hand it to the logger (TensorBoard or wandb)."""

    def __init__(self, image_dir: str | os.PathLike, every_n_steps: int = 1000, max_images: int = 4):
        self.image_dir, self.every_n_steps, self.max_images = Path(image_dir), every_n_steps, max_images
        self._last_step = -1

    @rank_zero_only
    def _write(self, trainer: pl.Trainer, split: str, batch) -> None:
        if batch is None:
            return
        grid = comparison_grid(*batch, max_images=self.max_images)
        out = self.image_dir / split / f"step-{trainer.global_step:06d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        torchvision.utils.save_image(grid, out)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(f"{split}/comparison", grid, trainer.global_step)
            elif isinstance(logger, WandbLogger):
                logger.log_image(f"{split}/comparison", [grid], step=trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # with gradient accumulation several batches share a step: write once
        if self.every_n_steps > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._last_step = step
            self._write(trainer, "train", getattr(pl_module, "_last_batch", None))

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._write(trainer, "val", getattr(pl_module, "_last_val_batch", None))


class ProgressBar(TQDMProgressBar):
    """Lightning's bar, refreshed every `refresh_rate` batches, showing the values the module read at
    its last logging step (`pl_module.progress`): no tensor is read for the bar between them."""

    def get_metrics(self, trainer, pl_module):
        return {**super().get_metrics(trainer, pl_module), **getattr(pl_module, "progress", {})}


class RunSetup(pl.Callback):
    """Creates the run folder and writes the merged configs (rank 0), as latent-diffusion does.

    The configs are written once the first training batch has completed: a resume whose overrides
    break training (a bad crop size, a mismatched blend) leaves the run's configs as they were, so
    a plain `-r` still works.
    """

    def __init__(self, logdir: str, now: str, config, lightning_config, hardware: dict | None = None):
        self.logdir, self.now = Path(logdir), now
        self.config, self.lightning_config, self.hardware = config, lightning_config, hardware
        self._written = False

    @rank_zero_only
    def setup(self, trainer, pl_module, stage: str) -> None:
        for sub in ("checkpoints", "configs", "images"):
            (self.logdir / sub).mkdir(parents=True, exist_ok=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._written:
            self._written = True
            self._write()

    @rank_zero_only
    def _write(self) -> None:
        OmegaConf.save(self.config, self.logdir / "configs" / f"{self.now}-project.yaml")
        OmegaConf.save(OmegaConf.create({"lightning": self.lightning_config}),
                       self.logdir / "configs" / f"{self.now}-lightning.yaml")
        if self.hardware is not None:  # for people; -r reads the trainer keys of the lightning config
            (self.logdir / "configs" / f"{self.now}-hardware.json").write_text(json.dumps(self.hardware, indent=1))


class EmergencyCheckpoint(pl.Callback):
    """`last.ckpt` on SIGUSR1 (at the next batch boundary, so the state is consistent) and at the end
    of training (ModelCheckpoint saves only at intervals and epoch ends). When training dies with an
    exception the state is saved to `exception.ckpt` for inspection, never to `last.ckpt`: an
    exception can come in the middle of a step (G updated, D not), and `-r` or a launcher's restart
    must continue from the last consistent state.

    The SIGUSR1 handler is installed when training starts, after Lightning's, and calls the handler
    it replaces: on SLURM, Lightning's auto-requeue (hpc checkpoint + `scontrol requeue`) still runs.
    """

    def __init__(self, ckpt_dir: str | os.PathLike):
        self.path = Path(ckpt_dir) / "last.ckpt"
        self.exception_path = Path(ckpt_dir) / "exception.ckpt"
        self.requested = False
        self._previous = None

    def on_train_start(self, trainer, pl_module) -> None:
        if not hasattr(signal, "SIGUSR1"):
            return
        try:
            self._previous = signal.signal(signal.SIGUSR1, self._request)
        except ValueError:  # not the main thread (e.g. inside a notebook executor)
            pass

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGUSR1, self._previous)
            self._previous = None

    def _request(self, signum, frame) -> None:
        self.requested = True
        if callable(self._previous):
            self._previous(signum, frame)

    def _save(self, trainer, path: Path | None = None) -> None:
        # No barrier (unlike trainer.save_checkpoint): the signal or the exception may reach one rank only.
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        trainer.strategy.save_checkpoint(checkpoint, path or self.path)  # writes on rank 0 only

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.requested:
            self.requested = False
            log.warning("SIGUSR1: saving %s", self.path)
            self._save(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        saved = getattr(trainer.checkpoint_callback, "_last_global_step_saved", None)
        if trainer.global_step > 0 and saved != trainer.global_step:
            trainer.save_checkpoint(self.path)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if trainer.global_step > 0 and trainer.state.fn == "fit":
            log.error("training stopped by %s; saving %s (last.ckpt keeps the last consistent state)",
                      type(exception).__name__, self.exception_path)
            self._save(trainer, self.exception_path)
