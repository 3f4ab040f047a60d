"""latent-diffusion's `main.py` contract on Lightning 2.x.

    python main.py --base configs/asym_base.yaml -t --gpus 0,1,2,3
    python main.py --base configs/asym_base.yaml configs/ablations/blend_concat.yaml -t --gpus 0,
    python main.py -r logs/2026-11-22T10-00-00_asym_base -t       # resume the exact training state
    python main.py --base configs/tiny.yaml -t lightning.trainer.max_steps=100   # dotlist overrides
    torchrun --nproc_per_node 8 main.py --base configs/asym_base.yaml -t          # or under srun

Configs are merged in order, then the dotlist overrides. Runs live in
`<logdir>/<time>_<name>/{checkpoints,configs,images}`. The run folder records the resolved
hardware (accelerator, devices, nodes, strategy, world size); -r reuses it unless overridden.
Under torchrun or SLURM every rank uses the job's one run folder, and a relaunch or requeue of the
same job (torchrun: same --rdzv-id; SLURM: same job id) resumes from its newest checkpoint.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import os
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

# Config loading and checks live in ldm_asym.config; re-exported here (tests and scripts import them from cli).
from ldm_asym.config import (  # noqa: F401
    CALLBACK_KEYS, LIGHTNING_KEYS, TOP_LEVEL, _signature, _type_problem, check_config, check_paths, load_config,
    merge, validate,
)

RUN_DIR_ENV = "LDM_ASYM_RUN_DIR"  # DDP children re-run this script; they must reuse rank 0's folder


def str2bool(v: str) -> bool:
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean expected, got {v!r}")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="main.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Any further `key.sub=value` argument overrides the merged config (OmegaConf dotlist).",
    )
    p.add_argument("-b", "--base", nargs="*", metavar="base_config.yaml", default=[],
                   help="configs, merged left to right")
    p.add_argument("-t", "--train", action="store_true", help="train (without -t the run is only set up and validated)")
    p.add_argument("-r", "--resume", default="", help="resume from a run folder or a checkpoint inside it")
    p.add_argument("-n", "--name", default="", help="run name (default: the last --base config's name)")
    p.add_argument("-s", "--seed", type=int, default=None,
                   help="seed for Lightning, the sampler and the noise (default 23; a resumed run keeps its own)")
    p.add_argument("-l", "--logdir", default="logs", help="folder that holds the run folders")
    p.add_argument("--gpus", default=None, help="GPU ids, e.g. '0,1,2,3' or '0,' (DDP when more than one)")
    p.add_argument("--scale_lr", type=str2bool, nargs="?", const=True, default=None,
                   help="lr = base_learning_rate x world size x batch x accumulation (default: config, true)")
    p.add_argument("--allow-new-world-size", action="store_true",
                   help="with -r: resume on a different number of processes. The lr is recomputed for the new "
                        "world size (when scale_lr) and the data position, kept as samples consumed in the "
                        "epoch's permutation, continues at the same sample; both are logged")
    return p


def parse_gpus(gpus: str | None) -> dict:
    """'0,1,' -> accelerator gpu, devices [0, 1]; None -> {} (the config decides)."""
    if gpus is None:
        return {}
    ids = [s.strip() for s in str(gpus).split(",") if s.strip()]
    if not ids:
        raise ValueError(f"--gpus {gpus!r} names no GPU (use e.g. '0,' or '0,1,2,3')")
    try:
        devices = [int(i) for i in ids]
    except ValueError:
        raise ValueError(f"--gpus takes comma-separated integer ids; got {gpus!r}") from None
    return {"accelerator": "gpu", "devices": devices}


# ---------------------------------------------------------------------- run folder
def resolve_resume(resume: str) -> tuple[Path, Path]:
    """(run folder, checkpoint). A damaged `last.ckpt` of a run folder falls back to the newest
    intact `step-*.ckpt` (logged); a damaged file named explicitly is an error that offers it."""
    from ldm_asym.train.checkpoint_io import usable_checkpoint

    path = Path(resume)
    if not path.exists():
        raise FileNotFoundError(f"cannot resume: {resume} does not exist")
    if path.is_file():  # <run>/checkpoints/<file>.ckpt
        return path.parent.parent, usable_checkpoint(path, fallback=False)
    ckpt = path / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        raise FileNotFoundError(f"cannot resume: no checkpoint at {ckpt}")
    return path, usable_checkpoint(ckpt, fallback=True)


def trainer_arguments(config: DictConfig, opt) -> tuple[dict, dict]:
    """(Trainer kwargs, the resolved hardware record): the one place that decides both."""
    from ldm_asym.train.launch import resolve_hardware

    light = config.get("lightning", OmegaConf.create())
    trainer_kwargs = OmegaConf.to_container(light.get("trainer", OmegaConf.create()), resolve=True)
    trainer_kwargs.update(parse_gpus(opt.gpus))
    trainer_kwargs, hardware = resolve_hardware(trainer_kwargs, light.get("ddp_timeout_s", 900))
    if isinstance(trainer_kwargs.get("val_check_interval"), int):
        # An integer interval counts batches across epoch boundaries: with 26+ GPUs an ImageNet epoch
        # is shorter than 5000 batches, which Lightning refuses unless this is None.
        if trainer_kwargs.get("check_val_every_n_epoch") not in (None, 1):
            print(f"note: check_val_every_n_epoch={trainer_kwargs['check_val_every_n_epoch']} is ignored: "
                  f"val_check_interval={trainer_kwargs['val_check_interval']} counts batches across epochs")
        trainer_kwargs["check_val_every_n_epoch"] = None
    return trainer_kwargs, hardware


def build_trainer(config: DictConfig, trainer_kwargs: dict, hardware: dict, logdir: Path, now: str):
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    from ldm_asym.train.callbacks import EmergencyCheckpoint, ImageLogger, ProgressBar, RunSetup
    from ldm_asym.train.checkpoint_io import AtomicCheckpointIO
    from ldm_asym.util import instantiate_from_config

    light = config.get("lightning", OmegaConf.create())
    trainer_kwargs = dict(trainer_kwargs)
    # Checkpoint files are written to a temporary name and renamed: a kill never corrupts last.ckpt.
    trainer_kwargs.setdefault("plugins", [AtomicCheckpointIO()])
    # The sampler shards by rank itself (and must stay resumable): Lightning must not replace it.
    trainer_kwargs.setdefault("use_distributed_sampler", False)

    callbacks_cfg = light.get("callbacks", OmegaConf.create())
    ckpt_cfg = callbacks_cfg.get("checkpoint", {})
    img_cfg = callbacks_cfg.get("images", {})
    ckpt_dir = logdir / "checkpoints"
    # The run folder records the hardware as resolved, so `-r` resumes on the same.
    saved_light = OmegaConf.create(OmegaConf.to_container(light, resolve=True))
    for key in ("accelerator", "devices", "num_nodes", "strategy"):
        OmegaConf.update(saved_light, f"trainer.{key}", hardware[key], force_add=True)
    callbacks = [
        RunSetup(str(logdir), now, OmegaConf.masked_copy(config, [k for k in config if k != "lightning"]),
                 saved_light, hardware),
        ModelCheckpoint(dirpath=ckpt_dir, filename="step-{step:06d}", auto_insert_metric_name=False,
                        every_n_train_steps=ckpt_cfg.get("every_n_steps", 5000), save_top_k=-1, save_last=True,
                        save_on_train_epoch_end=True, enable_version_counter=False),
        ImageLogger(logdir / "images", every_n_steps=img_cfg.get("every_n_steps", 1000),
                    max_images=img_cfg.get("max_images", 4)),
        EmergencyCheckpoint(ckpt_dir),
    ]
    if trainer_kwargs.get("enable_progress_bar", True):
        # Refreshed when values are logged: between logging steps there is nothing new to show.
        callbacks.append(ProgressBar(refresh_rate=trainer_kwargs.get("log_every_n_steps", 50)))
    logger = False
    if light.get("logger"):
        name = logdir.name
        defaults = {"save_dir": str(logdir)}
        target = light.logger.target
        if target.endswith("WandbLogger"):
            defaults.update(name=name, id=name.replace(":", "-"), project="ldm-asym")
        elif target.endswith(("CSVLogger", "TensorBoardLogger")):
            defaults.update(name="", version="")
        logger = instantiate_from_config(light.logger, **defaults)
    return pl.Trainer(default_root_dir=str(logdir), logger=logger, callbacks=callbacks, **trainer_kwargs)


def check_world_size(ckpt: Path, hardware: dict, config: DictConfig, allow: bool) -> None:
    """Refuse (or, when allowed, log) a resume on another number of processes: it changes the lr and
    how the epoch's samples are split, so it is never done silently."""
    import torch

    from ldm_asym.interop import META_KEY

    try:
        meta = torch.load(ckpt, map_location="cpu", mmap=True, weights_only=False).get(META_KEY, {})
    except Exception as e:  # noqa: BLE001 - any unreadable file: name it
        raise ValueError(f"cannot read the checkpoint {ckpt} to resume from ({type(e).__name__}: {e})") from e
    old = meta.get("hardware")
    if not old or old["world_size"] == hardware["world_size"]:
        return
    params = config.model.params
    new_lr = old["lr"]
    if params.get("scale_lr", True) and old.get("lr"):
        new_lr = old["lr"] / old["world_size"] * hardware["world_size"]
    change = (f"{ckpt} was trained on {old['world_size']} process(es) x batch {old['batch_size']}; resuming on "
              f"{hardware['world_size']} changes the lr from {old['lr']:.3g} to {new_lr:.3g} and splits the rest "
              f"of the epoch's samples {hardware['world_size']} ways (the data position, kept in samples, "
              f"continues at the same sample of the epoch's permutation)")
    if not allow:
        raise ValueError(f"world size changed: {change}. Resume with the recorded hardware "
                         f"({old['world_size']} processes), or pass --allow-new-world-size to accept this.")
    print(f"--allow-new-world-size: {change}")


def _exit_with_parent() -> None:
    """In a DDP process started by rank 0: exit when rank 0 dies (Lightning kills children that
    outlive a failed sibling, but nothing ends them when the launching process itself is killed)."""
    import threading
    import time

    parent = os.getppid()

    def watch():
        while True:
            time.sleep(2)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-rank0").start()


def check_writable(logdir: Path, need_bytes: int) -> None:
    """Fail before training when the run folder cannot be written or the disk is too full."""
    import shutil

    try:
        logdir.mkdir(parents=True, exist_ok=True)
        probe = logdir / ".write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise OSError(e.errno, f"cannot write the run folder {logdir}: {e.strerror or e}; choose another with -l") from e
    free = shutil.disk_usage(logdir).free
    if free < need_bytes:
        raise OSError(f"only {free / 2**30:.2f} GiB free in {logdir}; checkpoints need about "
                      f"{need_bytes / 2**30:.2f} GiB (a checkpoint and its temporary copy)")


def _checkpoint_bytes(model) -> int:
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    adam = sum(2 * p.numel() * 4 for p in model.parameters() if p.requires_grad)
    return 2 * (weights + adam)  # the new file is written beside the previous one


def _quiet() -> None:
    """Silence Lightning warnings that are expected here (they are about choices made on purpose)."""
    import warnings

    for msg in (".*pre-optimization state.*", ".*module\\(s\\) in eval mode.*", ".*LeafSpec.*",
                ".*does not have many workers.*",
                # Our sampler resumes mid-epoch by itself (ResumableSampler + the module's batch count).
                ".*dataloader is not resumable.*"):
        warnings.filterwarnings("ignore", message=msg)


# What a bad config, path, data folder or checkpoint raises before training starts.
SETUP_ERRORS = (ValueError, TypeError, KeyError, OSError)


def main(argv: list[str] | None = None) -> int:
    """Check everything, set up, train. Raises on bad input (tests match the exception)."""
    ready = prepare(argv)
    return 0 if ready is None else train(*ready)


def run(argv: list[str] | None = None) -> int:
    """`main.py`'s entry: a problem found before training is one line on stderr and exit code 2,
    not a traceback; an error during training keeps its traceback."""
    try:
        ready = prepare(argv)
    except SETUP_ERRORS as e:
        print(f"main.py: error: {e}", file=sys.stderr)
        return 2
    return 0 if ready is None else train(*ready)


def train(trainer, model, data, resume_ckpt: Path | None) -> int:
    trainer.fit(model, datamodule=data, ckpt_path=str(resume_ckpt) if resume_ckpt else None)
    return 0


def prepare(argv: list[str] | None = None):
    """Parse, validate and build everything; (trainer, model, data, checkpoint), or None without -t."""
    import pytorch_lightning as pl

    _quiet()
    if int(os.environ.get("LOCAL_RANK", 0)) > 0:
        _exit_with_parent()
    from ldm_asym.train.checkpoint_io import usable_checkpoint
    from ldm_asym.train.launch import job_run_dir, launcher, newest_checkpoint
    from ldm_asym.util import instantiate_from_config

    parser = get_parser()
    opt, unknown = parser.parse_known_args(argv)
    bad = [u for u in unknown if "=" not in u or u.startswith("-")]
    if bad:
        parser.error(f"unrecognised arguments {bad} (overrides look like key.sub=value)")
    if opt.name and opt.resume:
        parser.error("-n/--name cannot be given with -r/--resume (the run keeps its folder and name)")

    resume_ckpt = None
    base = list(opt.base)
    now = datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    job = launcher()
    if opt.resume:
        logdir, resume_ckpt = resolve_resume(opt.resume)
    else:
        if not base:
            parser.error("give at least one --base config (or -r to resume)")
        name = opt.name or Path(base[-1]).stem
        child = int(os.environ.get("LOCAL_RANK", 0)) > 0  # a DDP process started by rank 0
        if job is not None:  # torchrun / srun: one folder per job, found again after a restart
            logdir = job_run_dir(opt.logdir, name, job)
            resume_ckpt = newest_checkpoint(logdir)
            if resume_ckpt is not None:
                resume_ckpt = usable_checkpoint(resume_ckpt, fallback=True)
                print(f"{job['name']} job {job['key']} restarted: resuming from {resume_ckpt}")
        elif child and os.environ.get(RUN_DIR_ENV):
            logdir = Path(os.environ[RUN_DIR_ENV])
        else:
            logdir = Path(opt.logdir) / f"{now}_{name}"
    if resume_ckpt is not None:
        # The run's own saved configs first, then anything given now (e.g. a longer max_steps).
        saved = sorted(glob.glob(str(logdir / "configs" / "*.yaml")))
        if not saved:  # a checkpoint outside a run folder: a new run, from the configs given now
            if not base:
                parser.error(f"{resume_ckpt} is not inside a run folder (<run>/checkpoints/, with <run>/configs/"
                             f"*.yaml): also give the configs it was trained with, -r {resume_ckpt} --base config.yaml")
            logdir = Path(opt.logdir) / f"{now}_{Path(base[-1]).stem}"
        base = saved + base
    if not opt.resume and resume_ckpt is None:
        now = logdir.name.split("_", 1)[0]
    os.environ[RUN_DIR_ENV] = str(logdir)

    configs = [load_config(b) for b in base]
    try:
        config = merge(*configs, OmegaConf.from_dotlist(unknown))
    except Exception as e:  # noqa: BLE001 - OmegaConf's errors: say which override and why
        raise ValueError(f"cannot apply the overrides {unknown} to {base}: {type(e).__name__}: {e}") from e
    validate(config)  # before anything below reads a section that might be missing
    if opt.scale_lr is not None:
        config.model.params.scale_lr = opt.scale_lr
    # The seed drives the data order and the posterior noise: a resumed run keeps the one it saved.
    seed = opt.seed if opt.seed is not None else OmegaConf.select(config, "data.params.seed", default=None)
    seed = 23 if seed is None else seed
    OmegaConf.update(config, "data.params.seed", seed, force_add=True)
    OmegaConf.resolve(config)
    if not opt.resume:
        check_paths(config)

    pl.seed_everything(seed, workers=True)
    data = instantiate_from_config(config.data)
    data.build()  # missing or empty data fails here, before the VAE is loaded
    model_cfg = config.model.copy()
    if resume_ckpt is not None:
        model_cfg.params.vae_source = None  # every weight comes from the checkpoint
    trainer_kwargs, hardware = trainer_arguments(config, opt)
    if resume_ckpt is not None:
        check_world_size(resume_ckpt, hardware, config, opt.allow_new_world_size)
    model = instantiate_from_config(OmegaConf.to_container(model_cfg))
    trainer = build_trainer(config, trainer_kwargs, hardware, logdir, now)
    if not opt.train:
        print(f"config OK; run folder would be {logdir} (add -t to train)")
        return None
    if trainer.global_rank == 0:
        check_writable(logdir, _checkpoint_bytes(model))
    return trainer, model, data, resume_ckpt


if __name__ == "__main__":
    sys.exit(run())
