"""The Lightning module: frozen SD VAE encoder, trainable asymmetric decoder, LPIPS + PatchGAN loss.

One "step" is one generator update, which with `accumulate_grad_batches: 1` (the paper) is one
batch. Lightning would count the discriminator's update too (its `global_step` counts every
optimizer step), so the D update goes through the strategy without touching the counter:
`global_step`, `max_steps`, `disc_start`, checkpoint and image intervals all count batches.
"""

from __future__ import annotations

import copy
import math
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from ldm_asym import metrics
from ldm_asym.interop import META_KEY, init_from_vae
from ldm_asym.models import AsymmetricAutoencoder
from ldm_asym.util import instantiate_from_config


def lr_factor(step: int, warmup_steps: int, total_steps: int, start: float, floor: float) -> float:
    """Linear warm-up from `start` to 1 over `warmup_steps`, then cosine down to `floor` at `total_steps`."""
    if step < warmup_steps:
        return start + (1 - start) * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _numpy_state() -> list:
    # As plain Python values, so checkpoints stay loadable with torch.load(weights_only=True).
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


class NonFiniteTrainingError(RuntimeError):
    """Too many NaN/Inf updates in a row."""


class AsymmetricVQGAN(pl.LightningModule):
    """Trains the decoder of an `AsymmetricAutoencoder` (paper §3-4).

    Args:
        autoencoder: `AsymmetricAutoencoder` kwargs (`vae_config`, `decoder`).
        vae_source: SD VAE weights (anything `load_autoencoder` reads) for the frozen encoder and,
            where shapes match, the SD-shaped part of the decoder; null leaves them random (tests).
        init_decoder_from_vae: start the decoder's SD-shaped part from the SD decoder (base variant).
        loss: `{target, params}` of the loss (default `ldm_asym.losses.AsymLoss`).
        base_learning_rate: per-sample lr; the used lr is this x world size x batch x accumulation
            when `scale_lr`, as in latent-diffusion (paper: 4.5e-6 -> 3.6e-4 on 8 GPUs x 10).
        pretrained_lr_scale: lr multiplier for decoder weights initialised from the SD decoder.
        betas, warmup_steps, warmup_start, min_lr: Adam(0.5, 0.9); linear warm-up x0.01 -> x1, then
            cosine to `min_lr` (absolute) at the end of training.
        accumulate_grad_batches, gradient_clip_val: under manual optimisation these live here.
        ema_decay: keep an EMA of the decoder (null = off); `validate_with_ema` uses it for validation.
        train_encoder: stage 1 (a whole KL autoencoder, LDM's first stage): encoder and quant convs
            train too. With `blend: none` this trains the frozen encoder that stage 2 then uses.
        channels_last, compile: speed switches (NHWC tensors; `torch.compile` of decoder, LPIPS (when
            weighted) and discriminator in place, so checkpoint keys do not change).
        check_finite, max_nonfinite_steps: skip (and count) updates whose loss or gradients are not
            finite; stop after this many in a row, keeping `checkpoints/before-nonfinite.ckpt`.
    """

    def __init__(
        self,
        autoencoder: Mapping[str, Any],
        vae_source: str | None = None,
        init_decoder_from_vae: bool = True,
        loss: Mapping[str, Any] | None = None,
        base_learning_rate: float = 4.5e-6,
        scale_lr: bool = True,
        pretrained_lr_scale: float = 0.1,
        betas: tuple[float, float] = (0.5, 0.9),
        warmup_steps: int = 5000,
        warmup_start: float = 0.01,
        min_lr: float = 1e-6,
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = None,
        ema_decay: float | None = None,
        validate_with_ema: bool = True,
        train_encoder: bool = False,
        channels_last: bool = False,
        compile: bool = False,
        check_finite: bool = True,
        max_nonfinite_steps: int = 20,
        trust_pickle: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        if accumulate_grad_batches < 1:
            raise ValueError(f"accumulate_grad_batches must be >= 1; got {accumulate_grad_batches}")
        self.model = AsymmetricAutoencoder(**autoencoder, freeze_encoder=not train_encoder)
        self.loss = instantiate_from_config(loss or {"target": "ldm_asym.losses.AsymLoss"})
        # Names of decoder params that start from the SD decoder (trained at lr x pretrained_lr_scale).
        self.pretrained_names: list[str] = []
        if vae_source is not None:
            names = init_from_vae(self.model, vae_source, init_decoder=init_decoder_from_vae,
                                  trust_pickle=trust_pickle)
            self.pretrained_names = sorted(names)
        # The EMA decoder is a module of its own, so it moves with the model and is checkpointed as
        # `ema_decoder.*` (export and evaluation read it with use_ema / --ema).
        self.ema_decoder = copy.deepcopy(self.model.decoder).requires_grad_(False) if ema_decay else None
        self._batches_seen = 0  # batches trained on, all epochs (posterior-noise seed)
        self._epoch_batches = 0  # batches trained on in the current epoch (mid-epoch resume)
        self._resume_epoch_batches = 0
        self._micro_batches = 0
        self._nonfinite_run = self._nonfinite_total = self._first_nonfinite = 0
        self.lr = None  # set in configure_optimizers, once the world size and batch size are known

    # ------------------------------------------------------------------ optimisation
    def _batch_size(self) -> int:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "batch_size"):
            return dm.batch_size
        return self.trainer.train_dataloader.batch_size

    def configure_optimizers(self):
        hp = self.hparams
        lr = hp.base_learning_rate
        if hp.scale_lr:
            world, batch, accum = self.trainer.world_size, self._batch_size(), hp.accumulate_grad_batches
            lr = world * batch * accum * hp.base_learning_rate
            rank_zero_info(f"lr = {world} (world) x {batch} (batch) x {accum} (accumulation) x "
                           f"{hp.base_learning_rate:.2e} (base) = {lr:.2e}")
        else:
            rank_zero_info(f"lr = {lr:.2e} (not scaled)")
        self.lr = lr
        pretrained = set(self.pretrained_names)
        trained = self.model if hp.train_encoder else self.model.decoder
        prefix = "decoder." if hp.train_encoder else ""  # pretrained names are relative to the decoder
        named = [(n[len(prefix):] if n.startswith(prefix) else "/" + n, p) for n, p in trained.named_parameters()]
        groups = [
            {"params": [p for n, p in named if n not in pretrained], "lr_scale": 1.0, "name": "new"},
            {"params": [p for n, p in named if n in pretrained], "lr_scale": hp.pretrained_lr_scale,
             "name": "pretrained"},
        ]
        groups = [g for g in groups if g["params"]]
        fused = torch.cuda.is_available() and self.device.type == "cuda"
        opt_g = torch.optim.Adam(groups, lr=lr, betas=tuple(hp.betas), fused=fused or None)
        opt_d = torch.optim.Adam(self.loss.discriminator.parameters(), lr=lr, betas=tuple(hp.betas),
                                 fused=fused or None)
        return [opt_g, opt_d]

    def total_steps(self) -> int:
        if self.trainer.max_steps and self.trainer.max_steps > 0:
            return self.trainer.max_steps
        return int(self.trainer.estimated_stepping_batches) // self.hparams.accumulate_grad_batches

    def lr_at(self, step: int, start_step: int = 0) -> float:
        """The schedule is a pure function of the step, so a resumed run follows it exactly."""
        hp = self.hparams
        floor = min(1.0, hp.min_lr / self.lr) if self.lr else 0.0
        return self.lr * lr_factor(step - start_step, hp.warmup_steps, self.total_steps() - start_step,
                                   hp.warmup_start, floor)

    def _set_lr(self, opt, lr: float) -> None:
        for group in opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    # ------------------------------------------------------------------ training
    def setup(self, stage: str) -> None:
        if self.hparams.channels_last:
            self.to(memory_format=torch.channels_last)
        if self.hparams.compile:
            self.model.decoder.compile()
            self.loss.discriminator.compile()
            if self.loss.perceptual_weight > 0:
                self.loss.perceptual.compile()

    def _noise_generator(self, step: int) -> torch.Generator:
        # Posterior noise from (seed, step, rank): identical after a resume, no global RNG involved.
        seed = getattr(self.trainer.datamodule, "seed", 0) if self.trainer.datamodule else 0
        g = torch.Generator(device=self.device)
        g.manual_seed(((seed * 1_000_003 + step) * 1009 + self.global_rank) % (2**63 - 1))
        return g

    def training_step(self, batch: dict, batch_idx: int):
        hp = self.hparams
        opt_g, opt_d = self.optimizers()
        x, mask = batch["image"], batch["mask"]
        if hp.channels_last:
            x, mask = x.contiguous(memory_format=torch.channels_last), mask.contiguous(memory_format=torch.channels_last)
        step = self.global_step  # completed generator updates = batches so far (accumulation 1)
        self._batches_seen += 1
        self._epoch_batches += 1
        self._micro_batches += 1
        boundary = self._micro_batches % hp.accumulate_grad_batches == 0

        # Generator. D's params are toggled off so g_loss leaves no gradient in D.
        self.toggle_optimizer(opt_g)
        with torch.set_grad_enabled(hp.train_encoder):
            posterior = self.model.encode(x)
            z = posterior.sample(generator=self._noise_generator(self._batches_seen - 1))
        rec = self.model.decode(z, image=x, mask=mask, check_inputs=False)
        g_loss, log = self.loss.generator_loss(x, rec, posterior, step=step,
                                               last_layer=self.model.decoder.conv_out.weight)
        self.manual_backward(g_loss / hp.accumulate_grad_batches)
        self.untoggle_optimizer(opt_g)
        if boundary:
            if not self._finite(g_loss, opt_g):
                self._skip_nonfinite("generator", step, opt_g, opt_d)
                return
            self._set_lr(opt_g, self.lr_at(step))
            if hp.gradient_clip_val:
                self.clip_gradients(opt_g, gradient_clip_val=hp.gradient_clip_val, gradient_clip_algorithm="norm")
            opt_g.step()  # counted by Lightning: global_step += 1
            opt_g.zero_grad(set_to_none=True)
            if self.ema_decoder is not None:
                self._update_ema()

        if self.loss.gan_active(step):
            d_loss, d_log = self.loss.discriminator_loss(x, rec.detach(), step=step)
            self.manual_backward(d_loss / hp.accumulate_grad_batches)
            log.update(d_log)
            if boundary:
                if not self._finite(d_loss, opt_d):
                    self._skip_nonfinite("discriminator", step, opt_d)
                else:
                    self._set_lr(opt_d, self.lr_at(step, start_step=self.loss.disc_start))
                    if hp.gradient_clip_val:
                        self.clip_gradients(opt_d, gradient_clip_val=hp.gradient_clip_val,
                                            gradient_clip_algorithm="norm")
                    # Not opt_d.step(): that would count a second "step" per batch in global_step.
                    self.trainer.strategy.optimizer_step(opt_d.optimizer, closure=lambda: None, model=self)
                    opt_d.zero_grad(set_to_none=True)
        if boundary:
            self._nonfinite_run = 0

        skipped = batch.get("n_skipped")
        if skipped is not None:
            log["data/skipped"] = skipped.sum().float()
        log["lr"] = torch.tensor(opt_g.param_groups[0]["lr"])
        self.log_dict(log, prog_bar=False, logger=True, on_step=True, on_epoch=False, sync_dist=False)
        self.log("loss", log["loss/total"], prog_bar=True, logger=False)
        if "disc/loss" in log:
            self.log("d_loss", log["disc/loss"], prog_bar=True, logger=False)
        self._last_batch = (x.detach(), mask.detach(), rec.detach())

    # ------------------------------------------------------------------ non-finite steps
    def _finite(self, loss: torch.Tensor, opt) -> bool:
        """Loss and gradients finite on every rank (grads are all-reduced, the loss is not: reduce
        the verdict so all ranks skip together instead of diverging)."""
        if not self.hparams.check_finite:
            return True
        grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
        ok = torch.isfinite(loss.detach()).all()
        if grads and self.trainer.precision not in ("16-mixed", "16"):  # fp16: GradScaler's job
            ok = ok & torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()
        if self.trainer.world_size > 1:
            ok = self.all_gather(ok.float()).min() > 0
        return bool(ok)

    def _skip_nonfinite(self, what: str, step: int, *opts) -> None:
        """Drop this update; the model is untouched, so the current state is the last good one."""
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        self._nonfinite_run += 1
        self._nonfinite_total += 1
        self.log("train/nonfinite_skipped", float(self._nonfinite_total), on_step=True, logger=True)
        ckpt_dir = getattr(self.trainer.checkpoint_callback, "dirpath", None)
        good = Path(ckpt_dir) / "before-nonfinite.ckpt" if ckpt_dir else None
        if self._nonfinite_run == 1:
            self._first_nonfinite = step
            rank_zero_warn(f"non-finite {what} loss or gradients at step {step}: update skipped")
            if good is not None:  # no barrier: every rank reaches this line, only rank 0 writes
                self.trainer.strategy.save_checkpoint(self.trainer._checkpoint_connector.dump_checkpoint(), good)
        if self._nonfinite_run >= self.hparams.max_nonfinite_steps:
            raise NonFiniteTrainingError(
                f"{self._nonfinite_run} non-finite updates in a row (first at step {self._first_nonfinite}); "
                f"stopping. The state before the first one is in {good}. Lower the lr, enable "
                f"gradient_clip_val, or check the data.")

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = self.hparams.ema_decay
        ema, live = self.ema_decoder.state_dict(), self.model.decoder.state_dict()
        floats = [k for k, v in live.items() if v.dtype.is_floating_point]
        torch._foreach_lerp_([ema[k] for k in floats], [live[k] for k in floats], 1 - decay)
        for k in live.keys() - set(floats):
            ema[k].copy_(live[k])

    def on_train_epoch_start(self) -> None:
        self._epoch_batches = self._resume_epoch_batches
        self._resume_epoch_batches = 0

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: dict, batch_idx: int):
        x, mask = batch["image"], batch["mask"]
        live = self.model.decoder
        if self.ema_decoder is not None and self.hparams.validate_with_ema:
            self.model.decoder = self.ema_decoder  # swap modules, no copies
        try:
            z = self.model.encode(x).mode()
            rec = self.model.decode(z, image=x, mask=mask, check_inputs=False).float().clamp(-1, 1)
        finally:
            self.model.decoder = live
        x = x.float()
        log = {
            "val/l1": (x - rec).abs().mean(dim=(1, 2, 3)),
            "val/psnr_known": metrics.psnr(x, rec, metrics.known_region(mask)),
            "val/psnr_hole": metrics.psnr(x, rec, metrics.hole_region(mask)),
            "val/unmasked_error": metrics.unmasked_error(x, rec, mask),
            "val/lpips": self.loss.perceptual_loss(x, rec).flatten(),
        }
        for k, v in log.items():
            self.log(k, torch.nanmean(v), on_epoch=True, sync_dist=True, batch_size=x.shape[0])
        if batch_idx == 0:
            self._last_val_batch = (x, mask, rec)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        meta = {
            # Training draws no global randomness (sampler and noise are seeded), but user code or a
            # library might: restore the generators too so a resume continues them.
            "rng": {"torch": torch.get_rng_state(), "numpy": _numpy_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            "model_config": self.model.config(),
            "pretrained_names": self.pretrained_names,
            "batches_seen": self._batches_seen,
            "epoch_batches": self._epoch_batches,
            "version": __import__("ldm_asym").__version__,
        }
        checkpoint[META_KEY] = meta

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        meta = checkpoint.get(META_KEY, {})
        rng = meta.get("rng")
        if rng:
            torch.set_rng_state(rng["torch"])
            np.random.set_state((rng["numpy"][0], np.asarray(rng["numpy"][1], dtype=np.uint32), *rng["numpy"][2:]))
            random.setstate(rng["python"])
            if rng["cuda"] and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(rng["cuda"])
        self.pretrained_names = list(meta.get("pretrained_names", self.pretrained_names))
        self._batches_seen = meta.get("batches_seen", 0)
        # Resuming mid-epoch: the sampler is deterministic, so skipping what this epoch already
        # consumed continues the exact sample sequence. Our own count, saved with the checkpoint:
        # Lightning saves its batch progress before the batch counts as completed.
        self._resume_epoch_batches = meta.get("epoch_batches", 0)
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is not None and hasattr(dm, "resume_mid_epoch"):
            self._resume_epoch_batches = dm.resume_mid_epoch(self._resume_epoch_batches)
