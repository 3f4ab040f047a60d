"""The Lightning module: frozen SD VAE encoder, trainable asymmetric decoder, LPIPS + PatchGAN loss.

One "step" is one generator update, which with `accumulate_grad_batches: 1` (the paper) is one
batch. Lightning would count the discriminator's update too (its `global_step` counts every
optimizer step), so the D update goes through the strategy without touching the counter:
`global_step`, `max_steps`, `disc_start`, checkpoint and image intervals all count batches.

Distributed: Lightning's DDP wrapper syncs the generator only. The discriminator is kept out of it
(its gradients are averaged by hand, once, at the D update), so neither backward all-reduces the
other's gradients and the generator's DDP needs no `find_unused_parameters` graph walk.

No host-device sync per step: the non-finite verdict stays on the device (fused Adam's `found_inf`
drops a bad update inside the kernel) and is read, with everything logged, only at logging steps.
"""

from __future__ import annotations

import copy
import math
import random
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch.nn.parallel import DistributedDataParallel

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


# Mixed precision that needs a GradScaler: not supported (see AsymmetricVQGAN.setup).
FP16_PRECISIONS = ("16", "16-mixed", "16-true")
FP16_WHY = ("fp16 needs a GradScaler, which does not fit this loop's two optimisers and on-device update "
            "skipping, and the GAN's adaptive weight (gradients at the last layer) underflows in fp16. Use "
            "bf16-mixed (Ampere or newer GPUs) or 32-true.")


def _numpy_state() -> list:
    # As plain Python values, so checkpoints stay loadable with torch.load(weights_only=True).
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _all_reduce_mean_(grads: list[torch.Tensor]) -> None:
    """Average `grads` over all ranks in one collective (one flat buffer)."""
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat.div_(dist.get_world_size())
    torch._foreach_copy_(grads, [f.view_as(g) for f, g in zip(flat.split([g.numel() for g in grads]), grads)])


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
        lr_scales: {name prefix: multiplier} for decoder parameters whose names start with the
            prefix (e.g. {"conv_out.": 1.0}: the output conv at the branch's lr instead of x
            `pretrained_lr_scale`); each prefix gets its own optimizer group. Not in the paper
            (default none): part of the fast start, docs/convergence.md.
        betas, warmup_steps, warmup_start, min_lr: Adam(0.5, 0.9); linear warm-up x0.01 -> x1, then
            cosine to `min_lr` (absolute) at the end of training.
        accumulate_grad_batches, gradient_clip_val: under manual optimisation these live here.
        ema_decay: keep an EMA of the decoder (null = off); `validate_with_ema` uses it for validation.
        train_encoder: stage 1 (a whole KL autoencoder, LDM's first stage): encoder and quant convs
            train too. With `blend: none` this trains the frozen encoder that stage 2 then uses.
        channels_last, compile: speed switches (NHWC tensors; `torch.compile` of decoder, LPIPS (when
            weighted) and discriminator in place, so checkpoint keys do not change).
        check_finite, max_nonfinite_steps: drop (and count, per optimiser) updates whose loss or
            gradients are not finite on any rank. The verdict stays on the device and is read at
            logging steps (`trainer.log_every_n_steps`): then the first bad update of each run of
            them saves `checkpoints/before-nonfinite.ckpt` (a state no bad update touched), and a
            run of `max_nonfinite_steps` bad G or D updates in a row stops training. A dropped
            update still counts as a step (as fp16's GradScaler does), so schedules move on.
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
        lr_scales: Mapping[str, float] | None = None,
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
        self.val_metrics = self.make_val_metrics()
        self._batches_seen = 0  # batches trained on, all epochs (posterior-noise seed)
        # Samples consumed in the current epoch, all ranks together (mid-epoch resume): a position in
        # the epoch's permutation that means the same on any number of ranks.
        self._epoch_samples = 0
        self._resume_epoch_samples = 0
        self._micro_batches = 0  # batches since the start of training, for accumulation windows
        self._window_start_buffers: dict[str, torch.Tensor] = {}
        # Non-finite updates, on the device: [G run, D run, G total, D total] (runs = in a row).
        self.register_buffer("nonfinite_counts", torch.zeros(4, dtype=torch.long), persistent=False)
        self._seen_counts = [0, 0, 0, 0]  # the counts as last read on the host
        self.progress: dict[str, float] = {}  # shown by the progress bar, updated at logging steps
        self.lr = None  # set in configure_optimizers, once the world size and batch size are known

    # ------------------------------------------------------------------ optimisation
    def _samples_per_batch(self) -> int:
        return self._batch_size() * self.trainer.world_size if self._trainer is not None else 0

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
        scales = dict(hp.lr_scales or {})
        unmatched = [k for k in scales if not any(n.startswith(k) for n, _ in named)]
        if unmatched:
            raise ValueError(f"model.params.lr_scales: no trained parameter name starts with {unmatched} "
                             f"(names are relative to the decoder, e.g. 'conv_out.', 'condition_encoder.')")
        # A parameter matching several prefixes goes with the longest (the most specific) one.
        match = {n: max((k for k in scales if n.startswith(k)), key=len, default=None) for n, _ in named}
        scaled = {k: [p for n, p in named if match[n] == k] for k in scales}
        taken = {id(p) for ps in scaled.values() for p in ps}
        groups = [
            {"params": [p for n, p in named if n not in pretrained and id(p) not in taken], "lr_scale": 1.0,
             "name": "new"},
            {"params": [p for n, p in named if n in pretrained and id(p) not in taken],
             "lr_scale": hp.pretrained_lr_scale, "name": "pretrained"},
        ]
        groups += [{"params": ps, "lr_scale": float(scales[k]), "name": k} for k, ps in scaled.items()]
        groups = [g for g in groups if g["params"]]
        # Fused Adam (CPU and CUDA): one kernel per step, and it takes `found_inf`, which is how a
        # non-finite update is dropped without the host looking at the verdict.
        opt_g = torch.optim.Adam(groups, lr=lr, betas=tuple(hp.betas), fused=True)
        opt_d = torch.optim.Adam(self.loss.discriminator.parameters(), lr=lr, betas=tuple(hp.betas), fused=True)
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
        precision = str(self.trainer.precision) if self._trainer is not None else ""
        if precision in FP16_PRECISIONS:
            raise ValueError(f"lightning.trainer.precision={precision} is not supported: {FP16_WHY}")
        if self.hparams.channels_last:
            self.to(memory_format=torch.channels_last)
        if self.hparams.compile:
            # The adaptive weight's autograd.grad(..., retain_graph=True) runs through the compiled
            # LPIPS and D backwards, which refuse retain_graph when they donate buffers.
            torch._functorch.config.donated_buffer = False
            # The decoder's output conv stays eager: the adaptive GAN weight differentiates w.r.t.
            # its weight, which then costs that conv's backward instead of the whole compiled graph's.
            self.model.decoder.compile_features()
            self.loss.discriminator.compile()
            if self.loss.perceptual_weight > 0:
                self.loss.perceptual.compile()
        # Lightning wraps this module in DDP after setup: keep D out of it (see the module docstring).
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            self, [f"loss.discriminator.{n}" for n in self.loss.discriminator.state_dict()])

    def on_train_start(self) -> None:
        # D is outside DDP, so nothing else makes its replicas start equal.
        if self._distributed():
            for t in self.loss.discriminator.state_dict().values():
                dist.broadcast(t, src=0)

    def _distributed(self) -> bool:
        return self.trainer.world_size > 1 and dist.is_available() and dist.is_initialized()

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
        self._epoch_samples += x.shape[0] * self.trainer.world_size
        self._micro_batches += 1
        boundary = self._micro_batches % hp.accumulate_grad_batches == 0
        if hp.accumulate_grad_batches > 1 and self._micro_batches % hp.accumulate_grad_batches == 1:
            # D's BatchNorm statistics at the window's start, for a checkpoint taken inside it (a few
            # KB, copied on the device).
            self._window_start_buffers = {n: b.clone() for n, b in self.loss.discriminator.named_buffers()}
        # Between accumulation boundaries nothing is all-reduced.
        no_sync = getattr(self.trainer.strategy, "block_backward_sync", None)
        g_sync = nullcontext() if boundary or no_sync is None else no_sync()
        gan = self.loss.gan_active(step)

        # Generator. D's params are toggled off so g_loss leaves no gradient in D.
        self.toggle_optimizer(opt_g)
        with torch.set_grad_enabled(hp.train_encoder):
            posterior = self.model.encode(x)
            z = posterior.sample(generator=self._noise_generator(self._batches_seen - 1))
        rec = self.model.decode(z, image=x, mask=mask, check_inputs=False)
        g_loss, log = self.loss.generator_loss(x, rec, posterior, step=step,
                                               last_layer=self.model.decoder.conv_out.weight, mask=mask)
        with g_sync:
            self.manual_backward(self._poisoned(g_loss) / hp.accumulate_grad_batches)
        self.untoggle_optimizer(opt_g)
        if boundary:
            ok = self._step(opt_g, 0, self.lr_at(step), opt_g.step)  # counted by Lightning: global_step += 1
            if self.ema_decoder is not None:
                self._update_ema(ok)

        if gan:
            d_loss, d_log = self.loss.discriminator_loss(x, rec.detach(), step=step)
            # D is not in the DDP wrapper: its backward must not arm the generator's reducer.
            with nullcontext() if no_sync is None else no_sync():
                self.manual_backward(self._poisoned(d_loss) / hp.accumulate_grad_batches)
            log.update(d_log)
            if boundary:
                if self._distributed():
                    _all_reduce_mean_([p.grad for p in self.loss.discriminator.parameters() if p.grad is not None])
                # Not opt_d.step(): that would count a second "step" per batch in global_step.
                self._step(opt_d, 1, self.lr_at(step, start_step=self.loss.disc_start),
                           lambda: self.trainer.strategy.optimizer_step(opt_d.optimizer, closure=lambda: None,
                                                                        model=self))
        self._last_batch = (x.detach(), mask.detach(), rec.detach())
        if self.trainer._logger_connector.should_update_logs:
            self._log_step(log, batch, opt_g, step)

    def _log_step(self, log: dict, batch: dict, opt_g, step: int) -> None:
        """Logging steps only: Python numbers become device tensors and counts are read here."""
        skipped = batch.get("n_skipped")
        if skipped is not None:
            log["data/skipped"] = skipped.sum().float()
        log["lr"] = float(opt_g.param_groups[0]["lr"])
        log["loss/disc_factor"] = self.loss.disc_factor_at(step)
        if self.hparams.check_finite:
            counts = self._check_nonfinite(step)
            log["train/nonfinite_skipped"] = float(counts[2] + counts[3])
            log["train/nonfinite_skipped_g"] = float(counts[2])
            log["train/nonfinite_skipped_d"] = float(counts[3])
        self.log_dict(log, prog_bar=False, logger=True, on_step=True, on_epoch=False, sync_dist=False)
        # For the progress bar (callbacks.ProgressBar): Python numbers, read here once. Logged
        # prog_bar tensors would be read with .item() after every batch, a sync each time.
        self.progress = {"loss": float(log["loss/total"])}
        if "disc/loss" in log:
            self.progress["d_loss"] = float(log["disc/loss"])

    # ------------------------------------------------------------------ updates, non-finite steps
    def _poisoned(self, loss: torch.Tensor) -> torch.Tensor:
        """`loss`, scaled by NaN where it is not finite (else by exactly 1): a bad loss on one rank then
        makes the all-reduced gradients non-finite on every rank, so all ranks drop the update
        together, with no extra collective and no host sync."""
        if not self.hparams.check_finite:
            return loss
        return loss * (loss.detach() * 0 + 1)

    def _step(self, opt, which: int, lr: float, step_fn) -> torch.Tensor | None:
        """Clip, then step `opt` unless its gradients are non-finite; `which` 0 = G, 1 = D.
        Returns the on-device verdict (None when unchecked)."""
        hp = self.hparams
        self._set_lr(opt, lr)
        raw = getattr(opt, "optimizer", opt)
        params = [p for group in raw.param_groups for p in group["params"] if p.grad is not None]
        ok = None
        if hp.gradient_clip_val:
            # Our own clip, not Lightning's: its precision plugin refuses to clip for fused optimisers.
            norm = torch.nn.utils.clip_grad_norm_(params, hp.gradient_clip_val, foreach=True)
        elif hp.check_finite and params:
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in params])))
        if hp.check_finite and params:
            ok = torch.isfinite(norm)
            counts = self.nonfinite_counts
            counts[which] = (counts[which] + 1) * (~ok)  # run of bad updates in a row
            counts[2 + which] += (~ok).long()
            raw.found_inf = (~ok).float()  # fused Adam skips the whole update when this is 1
        try:
            step_fn()
        finally:
            raw.__dict__.pop("found_inf", None)
        opt.zero_grad(set_to_none=True)
        return ok

    def _check_nonfinite(self, step: int) -> list[int]:
        """At logging steps: save `before-nonfinite.ckpt` once per new run of bad updates and stop
        after `max_nonfinite_steps` in a row. Bad updates were never applied, so the current state
        is a good one. Every rank holds the same counts (the verdict follows all-reduced gradients)."""
        counts = self.nonfinite_counts.tolist()
        ckpt_dir = getattr(self.trainer.checkpoint_callback, "dirpath", None)
        good = Path(ckpt_dir) / "before-nonfinite.ckpt" if ckpt_dir else None
        for which, name in ((0, "generator"), (1, "discriminator")):
            run, new, last_run = counts[which], counts[2 + which] - self._seen_counts[2 + which], self._seen_counts[which]
            # The previous run simply went on when the run grew by exactly the new bad updates.
            if new > 0 and not (last_run > 0 and run == last_run + new):
                rank_zero_warn(f"{new} non-finite {name} update(s) dropped by step {step}; "
                               f"saving the current (unaffected) state to {good}")
                if good is not None:  # no barrier: every rank reaches this line, only rank 0 writes
                    self.trainer.strategy.save_checkpoint(self.trainer._checkpoint_connector.dump_checkpoint(), good)
            if run >= self.hparams.max_nonfinite_steps:
                raise NonFiniteTrainingError(
                    f"{run} non-finite {name} updates in a row (by step {step}); stopping. None of them "
                    f"was applied; {good} holds the state from when they began. Lower the lr, enable "
                    f"gradient_clip_val, or check the data.")
        self._seen_counts = counts
        return counts

    @torch.no_grad()
    def _update_ema(self, ok: torch.Tensor | None) -> None:
        decay = self.hparams.ema_decay
        ema, live = self.ema_decoder.state_dict(), self.model.decoder.state_dict()
        floats = [k for k, v in live.items() if v.dtype.is_floating_point]
        ema_f, live_f = [ema[k] for k in floats], [live[k] for k in floats]
        if ok is None:
            torch._foreach_lerp_(ema_f, live_f, 1 - decay)
        else:  # a dropped update leaves the EMA as it was too (weight 0), decided on the device
            weight = ok.to(ema_f[0].dtype) * (1 - decay)
            torch._foreach_add_(ema_f, torch._foreach_mul(torch._foreach_sub(live_f, ema_f), weight))
        for k in live.keys() - set(floats):
            ema[k].copy_(live[k])

    def on_train_epoch_start(self) -> None:
        self._epoch_samples = self._resume_epoch_samples
        self._resume_epoch_samples = 0

    # ------------------------------------------------------------------ validation
    @staticmethod
    def make_val_metrics() -> torch.nn.ModuleDict:
        """The mean over all validation images of each per-image value, NaN (an empty region) skipped.

        The definition of scripts/evaluate.py's means (`val/psnr_hole`: mean of per-image PSNR over
        the hole). MeanMetric keeps a sum and a count, so the epoch value is exact however the images
        fall into batches and ranks.
        """
        from torchmetrics.aggregation import MeanMetric

        keys = ("l1", "psnr_known", "psnr_hole", "unmasked_error", "lpips")
        return torch.nn.ModuleDict({k: MeanMetric(nan_strategy="ignore") for k in keys})

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
        values = {
            "l1": (x - rec).abs().mean(dim=(1, 2, 3)),
            "psnr_known": metrics.psnr(x, rec, metrics.known_region(mask)),
            "psnr_hole": metrics.psnr(x, rec, metrics.hole_region(mask)),
            "unmasked_error": metrics.unmasked_error(x, rec, mask),
            "lpips": self.loss.perceptual_loss(x, rec).flatten(),
        }
        for k, v in values.items():
            # Logged as a Metric: Lightning computes it once per epoch from the states of every batch
            # and every rank (summed across ranks), not as a mean of per-batch or per-rank means.
            self.val_metrics[k].update(v.detach())
            self.log(f"val/{k}", self.val_metrics[k], on_epoch=True, batch_size=x.shape[0])
        if batch_idx == 0:
            self._last_val_batch = (x, mask, rec)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # A checkpoint inside an accumulation window (SIGUSR1, an exception) records the window's
        # start: a resume replays its micro-batches (data, crops, masks and noise are functions of
        # the position), since their gradients are not in the checkpoint.
        into_window = self._micro_batches % self.hparams.accumulate_grad_batches
        if into_window:
            for name, value in self._window_start_buffers.items():
                checkpoint["state_dict"][f"loss.discriminator.{name}"] = value
        meta = {
            # Training draws no global randomness (sampler and noise are seeded), but user code or a
            # library might: restore the generators too so a resume continues them.
            "rng": {"torch": torch.get_rng_state(), "numpy": _numpy_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            "model_config": self.model.config(),
            "pretrained_names": self.pretrained_names,
            "batches_seen": self._batches_seen - into_window,
            "epoch_samples": self._epoch_samples - into_window * self._samples_per_batch(),
            "micro_batches": self._micro_batches - into_window,
            "nonfinite_counts": self.nonfinite_counts.tolist(),
            "version": __import__("ldm_asym").__version__,
        }
        if self._trainer is not None:  # what the lr was computed from
            meta["hardware"] = {"world_size": self.trainer.world_size, "batch_size": self._batch_size(),
                                "accumulate_grad_batches": self.hparams.accumulate_grad_batches, "lr": self.lr}
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
        self._micro_batches = meta.get("micro_batches", self._batches_seen)
        counts = meta.get("nonfinite_counts")
        if counts is not None:
            self.nonfinite_counts.copy_(torch.tensor(counts))
            self._seen_counts = list(counts)
        # Resuming mid-epoch: the sampler is deterministic, so skipping what this epoch already
        # consumed continues the exact sample sequence. Our own count, saved with the checkpoint:
        # Lightning saves its batch progress before the batch counts as completed.
        samples = meta.get("epoch_samples")
        if samples is None:  # checkpoints of ldm-asym <= 0.1.0 counted batches per rank
            hw = meta.get("hardware", {})
            samples = meta.get("epoch_batches", 0) * hw.get("batch_size", 1) * hw.get("world_size", 1)
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is not None and hasattr(dm, "resume_mid_epoch"):
            samples = dm.resume_mid_epoch(samples)
        self._resume_epoch_samples = samples
