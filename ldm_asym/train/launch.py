"""One rule for how many processes train, and one run folder for all of them.

Whatever spells the hardware — `--gpus`, `devices` as an int, a string, a list or -1/"auto",
`strategy: ddp`, `num_nodes`, torchrun or srun — `resolve_hardware` asks Lightning itself what it
would run, and from a world size above 1 on always uses the same DDP strategy. Under a launcher
(torchrun, SLURM) the launcher fixes devices and nodes, and every rank, also after a restart or a
requeue, finds the run folder that the job's first rank 0 created (`job_run_dir`).
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from pathlib import Path

from lightning_fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

# The Trainer arguments that decide the hardware; they are recorded in the run folder.
HARDWARE_KEYS = ("accelerator", "devices", "num_nodes", "strategy")
JOBS_DIR = ".jobs"  # <logdir>/.jobs/<job key>: the run folder of a launcher's job


def launcher() -> dict | None:
    """{name, world_size, local_world_size, nodes, rank, key} of torchrun / SLURM, or None.

    `key` names the job across restarts (torchrun --max-restarts) and requeues (SLURM): SLURM's job
    id, torchrun's rendezvous id, or, when torchrun runs without one ("none"), its agent process.
    """
    if SLURMEnvironment.detect():
        world, nodes = int(os.environ["SLURM_NTASKS"]), int(os.environ.get("SLURM_NNODES", 1))
        job = os.environ.get("SLURM_JOB_ID", "0")
        if os.environ.get("SLURM_ARRAY_JOB_ID"):
            job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', 0)}"
        return dict(name="slurm", world_size=world, local_world_size=world // nodes, nodes=nodes,
                    rank=int(os.environ.get("SLURM_PROCID", 0)), key=f"slurm-{job}")
    if TorchElasticEnvironment.detect():
        _check_elastic_restarts()
        world = int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
        if run_id in ("", "none"):  # one agent per node: its pid and start time name this launch
            run_id = f"agent{os.getppid()}-{_start_time(os.getppid())}"
        return dict(name="torchrun", world_size=world, local_world_size=local, nodes=max(1, world // local),
                    rank=int(os.environ.get("RANK", 0)), key=f"torchrun-{run_id}")
    return None


def _check_elastic_restarts() -> None:
    """Refuse `torchrun --max-restarts N` while the workers share the agent's rendezvous store.

    torch >= 2.5 shares that store with the workers and keeps it across restarts, and the restarted
    process group reads the dead attempt's keys: gloo connects to the dead peer's old port, NCCL
    can get the old unique id (pytorch/pytorch#135712, #167288). Measured on CPU: 2 of 4 elastic
    restarts failed in connectFullMesh with it, 5 of 5 recovered without it. Refused at start,
    where it costs nothing, instead of at the first restart, days in.
    """
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS") or 0)
    if restarts > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        raise ValueError(
            f"torchrun --max-restarts {restarts} with a rendezvous store shared with the workers: a restarted "
            f"attempt reads the dead attempt's keys and fails to connect (pytorch/pytorch#135712). Launch "
            f"with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment, e.g. "
            f"TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --max-restarts {restarts} ...")


def _start_time(pid: int) -> str:
    try:  # field 22 of /proc/<pid>/stat: start time in clock ticks since boot
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "0"


def resolve_hardware(trainer_kwargs: dict, ddp_timeout_s: float) -> tuple[dict, dict]:
    """(Trainer kwargs with the final hardware, a record of it for the run folder)."""
    import pytorch_lightning as pl
    from pytorch_lightning.strategies import DDPStrategy

    kwargs = dict(trainer_kwargs)
    job = launcher()
    if job is not None:  # the launcher started the processes: it decides how many there are
        kwargs.update(devices=job["local_world_size"], num_nodes=job["nodes"])
    probe_kwargs = {k: kwargs[k] for k in HARDWARE_KEYS if k in kwargs}
    # Lightning's own resolution of accelerator, devices and strategy; the probe runs nothing.
    quiet = [logging.getLogger(n) for n in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric")]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.ERROR)
    try:
        probe = pl.Trainer(**probe_kwargs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                           enable_model_summary=False)
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)
    world = probe.world_size
    strategy = kwargs.get("strategy")
    ours = world > 1 and (strategy is None or strategy in ("auto", "ddp"))
    if ours:
        # Plain DDP: the discriminator is kept out of it by the module, so every parameter it
        # syncs is used in every generator backward (no find_unused_parameters graph walk).
        # Buffers are constants (or D's, outside DDP): no broadcast per forward. A bounded
        # timeout: if a rank dies, the others fail at their next collective instead of hanging.
        kwargs["strategy"] = DDPStrategy(find_unused_parameters=False, **_no_buffer_sync(),
                                         timeout=datetime.timedelta(seconds=ddp_timeout_s))
    accelerator = type(probe.accelerator).__name__.replace("Accelerator", "").lower()
    accelerator = {"cuda": "gpu"}.get(accelerator, accelerator)
    devices = list(probe.device_ids) if accelerator == "gpu" else probe.num_devices
    record = {"accelerator": accelerator, "devices": devices, "num_nodes": probe.num_nodes,
              "strategy": "ddp" if ours else (strategy if isinstance(strategy, str) else "auto"),
              "world_size": world, "launcher": job["name"] if job else None}
    return kwargs, record


def _no_buffer_sync() -> dict:
    """DDP's switch for "no buffer broadcast before each forward" (renamed in torch 2.14)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    params = inspect.signature(DistributedDataParallel).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def job_run_dir(logdir: str | os.PathLike, name: str, job: dict, timeout_s: float = 600) -> Path:
    """The run folder of this launcher job: rank 0 of its first start creates it, every other rank
    and every restart finds it through `<logdir>/.jobs/<key>` (a shared file system, as the
    checkpoints need anyway)."""
    marker = Path(logdir) / JOBS_DIR / job["key"]
    if job["rank"] == 0 and not marker.exists():
        now = datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
        run = Path(logdir) / f"{now}_{name}"
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_name(f".{marker.name}.{os.getpid()}.tmp")
        tmp.write_text(str(run))
        os.replace(tmp, marker)
        return run
    deadline = time.monotonic() + timeout_s
    while not marker.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"rank {job['rank']}: no run folder announced in {marker} after {timeout_s:.0f} s. Rank 0 "
                f"creates it: check rank 0's log, that {logdir} is on a file system all nodes share, and "
                f"(torchrun on several nodes) pass --rdzv-id so all nodes agree on the job")
        time.sleep(0.2)
    return Path(marker.read_text().strip())


def newest_checkpoint(run: Path) -> Path | None:
    """The newest of `checkpoints/last.ckpt` and Lightning's SLURM `hpc_ckpt_*.ckpt` (saved on requeue)."""
    found = [p for p in [run / "checkpoints" / "last.ckpt", *run.glob("hpc_ckpt_*.ckpt")] if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None
