"""Distributed training on CPU (gloo, 2 processes): every launch spelling takes one code path, D and G
sync only their own gradients, ranks stay identical, torchrun and SLURM find one run folder and
resume after a restart. Each test fails without the handling it names."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ldm_asym.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs/tiny.yaml")
FAST = ["lightning.trainer.enable_progress_bar=false", "lightning.trainer.limit_val_batches=0",
        "lightning.trainer.log_every_n_steps=1", "lightning.ddp_timeout_s=120"]

# main.py with instrumentation (every rank runs it): a DDP comm hook counts the elements the
# generator's reducer all-reduces, a wrapper counts what the D all-reduce moves; per batch, plus a
# hash of G's and D's weights at the end. DIE_AT_STEP kills rank DIE_RANK on a first launch.
WRAPPER = textwrap.dedent('''
    import hashlib, json, os, signal, sys
    sys.path.insert(0, os.environ["REPO"])
    import ldm_asym.train.module as M
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    out, counts, batches = os.environ["COMM_OUT"], {"g": 0, "d": 0}, []
    real_reduce, real_start, real_step = M._all_reduce_mean_, M.AsymmetricVQGAN.on_train_start, M.AsymmetricVQGAN.training_step

    def reduce_d(grads):
        counts["d"] += sum(g.numel() for g in grads)
        return real_reduce(grads)

    def hook(state, bucket):
        counts["g"] += bucket.buffer().numel()
        return allreduce_hook(state, bucket)

    def on_train_start(self):
        real_start(self)
        if hasattr(self.trainer.strategy.model, "register_comm_hook"):
            self.trainer.strategy.model.register_comm_hook(None, hook)

    def training_step(self, batch, batch_idx):
        first = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if first and self.global_step == int(os.environ.get("DIE_AT_STEP", -1)) and self.global_rank == int(os.environ.get("DIE_RANK", 1)):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_step(self, batch, batch_idx)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        batches.append({"batch": self._batches_seen, "step": self.global_step, "epoch": self.current_epoch,
                        "index": batch["index"].tolist(), **counts})
        counts.update(g=0, d=0)

    def digest(module):
        return hashlib.sha1(b"".join(p.detach().numpy().tobytes() for p in module.parameters())).hexdigest()

    def on_train_end(self):
        json.dump({"batches": batches, "g": digest(self.model.decoder), "d": digest(self.loss.discriminator),
                   "g_params": sum(p.numel() for p in self.model.decoder.parameters()),
                   "d_params": sum(p.numel() for p in self.loss.discriminator.parameters())},
                  open(os.path.join(out, f"rank{self.global_rank}.json"), "w"))

    M._all_reduce_mean_ = reduce_d
    M.AsymmetricVQGAN.on_train_start, M.AsymmetricVQGAN.training_step = on_train_start, training_step
    M.AsymmetricVQGAN.on_train_batch_end, M.AsymmetricVQGAN.on_train_end = on_train_batch_end, on_train_end
    from ldm_asym.cli import main
    sys.exit(main(sys.argv[1:]))
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TORCHELASTIC_")) and k not in ("LDM_ASYM_RUN_DIR", "LOCAL_RANK", "RANK",
                                                                         "WORLD_SIZE", "NODE_RANK")}
    (tmp_path / "comm").mkdir(exist_ok=True)
    env.update(REPO=str(REPO), PYTHONUNBUFFERED="1", COMM_OUT=str(tmp_path / "comm"), **extra)
    return env


def _wrapper(tmp_path) -> str:
    path = tmp_path / "instrumented_main.py"
    path.write_text(WRAPPER)
    return str(path)


def _ranks(tmp_path) -> list[dict]:
    found = sorted((tmp_path / "comm").glob("rank*.json"))
    assert len(found) == 2, found
    return [json.loads(p.read_text()) for p in found]


def _check_sync(ranks: list[dict], disc_start: int, accumulate: int = 1) -> None:
    """G's reducer moves the decoder once per update, D's all-reduce D once per update from
    disc_start on, nothing in between; both ranks end with identical G and D."""
    r0, r1 = ranks
    assert r0["g"] == r1["g"] and r0["d"] == r1["d"]
    for b in r0["batches"]:
        boundary = b["batch"] % accumulate == 0
        gan = (b["batch"] - 1) // accumulate >= disc_start
        assert b["g"] == (r0["g_params"] if boundary else 0), b
        assert b["d"] == (r0["d_params"] if boundary and gan else 0), b
    assert any(b["d"] for b in r0["batches"])  # D stepped


def _only_run(logdir: Path) -> Path:
    runs = [p for p in logdir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(runs) == 1, runs
    return runs[0]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


# ---------------------------------------------------------------------- one rule for every spelling
def _cuda(monkeypatch, n=2):
    """Lightning's view of a machine with `n` GPUs (its resolution only; nothing runs)."""
    from lightning_fabric.accelerators import cuda

    from pytorch_lightning.accelerators import CUDAAccelerator

    monkeypatch.setattr(cuda, "num_cuda_devices", lambda: n)
    monkeypatch.setattr(CUDAAccelerator, "is_available", staticmethod(lambda: True))
    monkeypatch.setattr(CUDAAccelerator, "auto_device_count", staticmethod(lambda: n))


@pytest.mark.parametrize("trainer,gpus", [
    ({"accelerator": "cpu", "devices": 2}, None),
    ({"accelerator": "cpu", "devices": "2"}, None),
    ({"accelerator": "cpu", "devices": 2, "strategy": "ddp"}, None),
    ({"accelerator": "cpu", "devices": 1, "num_nodes": 2}, None),
    ({"accelerator": "gpu", "devices": [0, 1]}, None),
    ({"accelerator": "gpu", "devices": "0,1"}, None),
    ({"accelerator": "gpu", "devices": -1}, None),
    ({"accelerator": "gpu", "devices": "auto"}, None),
    ({"accelerator": "auto", "devices": "auto"}, None),
    ({"devices": 1}, "0,1"),
    ({"accelerator": "gpu", "devices": 2, "strategy": "auto"}, None),
])
def test_every_spelling_of_two_processes_gets_our_ddp(monkeypatch, trainer, gpus):
    from pytorch_lightning.strategies import DDPStrategy

    from ldm_asym.cli import parse_gpus
    from ldm_asym.train.launch import resolve_hardware

    _cuda(monkeypatch)
    kwargs, hw = resolve_hardware({**trainer, **parse_gpus(gpus)}, ddp_timeout_s=60)
    assert hw["world_size"] == 2 and hw["strategy"] == "ddp"
    strategy = kwargs["strategy"]
    assert isinstance(strategy, DDPStrategy)
    assert strategy._ddp_kwargs["find_unused_parameters"] is False  # D is outside DDP: nothing goes unused
    assert strategy._timeout.total_seconds() == 60


def test_one_process_stays_single_device():
    from ldm_asym.train.launch import resolve_hardware

    kwargs, hw = resolve_hardware({"accelerator": "cpu", "devices": 1}, 60)
    assert hw["world_size"] == 1 and "strategy" not in kwargs


# ---------------------------------------------------------------------- real 2-process runs
@pytest.mark.parametrize("spelling,accumulate", [
    (['lightning.trainer.devices="2"', "lightning.trainer.strategy=ddp"], 2),
])  # devices=2 without accumulation: the shards test below
def test_ddp_syncs_g_and_d_separately_and_ranks_agree(tmp_path, spelling, accumulate):
    steps, disc_start = 4, 2
    cmd = [sys.executable, _wrapper(tmp_path), "--base", TINY, "-t", "-l", str(tmp_path / "logs"), *FAST, *spelling,
           "lightning.trainer.accelerator=cpu", f"lightning.trainer.max_steps={steps}",
           f"model.params.loss.params.disc_start={disc_start}", f"model.params.accumulate_grad_batches={accumulate}",
           "model.params.scale_lr=true", "model.params.base_learning_rate=1e-5"]
    out = subprocess.run(cmd, env=_env(tmp_path), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"lr = 2 (world) x 4 (batch) x {accumulate} (accumulation)" in out.stdout + out.stderr
    _check_sync(_ranks(tmp_path), disc_start, accumulate)
    run = _only_run(tmp_path / "logs")  # both ranks wrote into rank 0's run folder
    assert load(run / "checkpoints" / "last.ckpt")["global_step"] == steps


def test_two_ranks_train_from_shards_disjointly_and_resume_exactly(tmp_path):
    """Shards written by scripts/make_shards.py, `devices=2`: G and D sync as they should, within an
    epoch no sample is drawn twice (across ranks or within one), and a run resumed mid-epoch ends
    bit for bit like the straight one."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (tmp_path / "imgs").mkdir()
    for i in range(40):
        Image.fromarray(rng.integers(0, 255, (72, 80, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"{i:02d}.png")
    subprocess.run([sys.executable, "scripts/make_shards.py", "--input", str(tmp_path / "imgs"), "--out",
                    str(tmp_path / "shards"), "--part-size", "16"], cwd=REPO, check=True, capture_output=True)
    # 40 images, 2 ranks x batch 4: 5 steps per epoch; 8 steps cross into epoch 1; cut at step 3.
    args = ["--base", str(REPO / "configs/tiny_shards.yaml"), "-t", *FAST, f"paths.shards={tmp_path / 'shards'}",
            "lightning.trainer.accelerator=cpu", "lightning.trainer.devices=2", "lightning.trainer.max_steps=8",
            "lightning.callbacks.checkpoint.every_n_steps=3", "model.params.loss.params.disc_start=2",
            "model.params.scale_lr=true", "model.params.base_learning_rate=1e-5"]
    out = subprocess.run([sys.executable, _wrapper(tmp_path), *args, "-l", str(tmp_path / "a")], env=_env(tmp_path),
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "lr = 2 (world) x 4 (batch) x 1 (accumulation)" in out.stdout + out.stderr
    ranks = _ranks(tmp_path)
    _check_sync(ranks, disc_start=2)
    for epoch in (0, 1):
        drawn = [i for r in ranks for b in r["batches"] if b["epoch"] == epoch for i in b["index"]]
        assert len(drawn) == len(set(drawn)) == (40 if epoch == 0 else 3 * 8), (epoch, drawn)
    straight = _only_run(tmp_path / "a")

    cut = tmp_path / "b" / "cut_tiny_shards"
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "configs", cut / "configs")
    shutil.copy(straight / "checkpoints" / "step-000003.ckpt", cut / "checkpoints" / "last.ckpt")
    for p in (tmp_path / "comm").glob("*.json"):
        p.unlink()
    out = subprocess.run([sys.executable, _wrapper(tmp_path), "-r", str(cut), "-t", *FAST], env=_env(tmp_path),
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    resumed = _ranks(tmp_path)
    assert resumed[0]["batches"][0]["index"] == ranks[0]["batches"][3]["index"]  # mid-epoch, same samples
    a, b = load(straight / "checkpoints" / "last.ckpt"), load(cut / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 8
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k


def test_torchrun_trains_in_one_folder_restarts_and_a_relaunch_resumes(tmp_path):
    """torchrun --nproc_per_node 2 --max-restarts 1 main.py ...: rank 1 is killed at step 7, torchrun
    restarts both workers, which find the run folder and resume from step 5 (not 0) and finish; the
    same job launched again (same --rdzv-id, as a scheduler's retry does) resumes from step 10."""
    logs = tmp_path / "logs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--rdzv-id", "job-17",
           _wrapper(tmp_path), "--base", TINY, "-t", "-l", str(logs), *FAST, "lightning.trainer.max_steps=10",
           "lightning.callbacks.checkpoint.every_n_steps=5", "model.params.loss.params.disc_start=3"]
    elastic = dict(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")  # see launch._check_elastic_restarts
    out = subprocess.run(cmd, env=_env(tmp_path, DIE_AT_STEP="7", DIE_RANK="1", **elastic), cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    run = _only_run(logs)
    assert "torchrun job torchrun-job-17 restarted: resuming from" in out.stdout + out.stderr
    r0, r1 = _ranks(tmp_path)
    assert r0["batches"][0]["batch"] == 6  # the restart continued after step 5, not from 0
    assert r0["g"] == r1["g"] and r0["d"] == r1["d"]
    assert load(run / "checkpoints" / "last.ckpt")["global_step"] == 10

    cmd[cmd.index("--rdzv-endpoint") + 1] = f"127.0.0.1:{_free_port()}"
    cmd[cmd.index("lightning.trainer.max_steps=10")] = "lightning.trainer.max_steps=12"
    out = subprocess.run(cmd, env=_env(tmp_path, **elastic), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert _only_run(logs) == run
    final = load(run / "checkpoints" / "last.ckpt")
    assert final["global_step"] == 12 and final["ldm_asym"]["batches_seen"] == 12
    assert _ranks(tmp_path)[0]["batches"][0]["batch"] == 11


def test_elastic_restarts_with_a_shared_store_are_refused_at_start(monkeypatch, capsys):
    """torchrun --max-restarts N shares its store with the workers (torch >= 2.5 default): a restart
    would read the dead attempt's keys, so main.py refuses before training and names the switch."""
    from ldm_asym.cli import run

    for k, v in dict(TORCHELASTIC_RUN_ID="job", RANK="0", LOCAL_RANK="0", GROUP_RANK="0", WORLD_SIZE="2",
                     LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500",
                     TORCHELASTIC_MAX_RESTARTS="3", TORCHELASTIC_USE_AGENT_STORE="True").items():
        monkeypatch.setenv(k, v)
    assert run(["--base", TINY, "-t"]) == 2
    err = capsys.readouterr().err
    assert "--max-restarts 3" in err and "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in err
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # what the switch gives the workers
    from ldm_asym.train.launch import launcher

    assert launcher()["key"] == "torchrun-job"


def test_launcher_job_keys(monkeypatch):
    """A job's key survives restarts (same SLURM job / torchrun run id / agent) and differs between jobs."""
    from ldm_asym.train.launch import launcher

    for k in list(os.environ):
        if k.startswith(("SLURM_", "TORCHELASTIC_")):
            monkeypatch.delenv(k)
    assert launcher() is None
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # plain `torchrun` without --rdzv-id
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "3")
    job = launcher()
    assert job["name"] == "torchrun" and (job["world_size"], job["local_world_size"], job["nodes"], job["rank"]) == (4, 2, 2, 3)
    assert job["key"].startswith(f"torchrun-agent{os.getppid()}-") and job["key"] == launcher()["key"]
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job7")
    assert launcher()["key"] == "torchrun-job7"
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    for k, v in dict(SLURM_NTASKS="16", SLURM_NNODES="2", SLURM_PROCID="9", SLURM_JOB_ID="55", SLURM_JOB_NAME="x",
                     SLURM_ARRAY_JOB_ID="50", SLURM_ARRAY_TASK_ID="3").items():
        monkeypatch.setenv(k, v)
    job = launcher()
    assert (job["name"], job["local_world_size"], job["nodes"], job["rank"], job["key"]) == ("slurm", 8, 2, 9, "slurm-50_3")


def test_slurm_tasks_train_in_one_folder(tmp_path):
    """Two srun-style tasks (SLURM_* variables, as srun sets them): devices and nodes come from SLURM."""
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = _env(tmp_path, SLURM_NTASKS="2", SLURM_NNODES="1", SLURM_NTASKS_PER_NODE="2", SLURM_PROCID=str(rank),
                   SLURM_LOCALID=str(rank), SLURM_NODEID="0", SLURM_JOB_ID="4242", SLURM_JOB_NAME="asym",
                   SLURM_NODELIST="127.0.0.1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen(
            [sys.executable, _wrapper(tmp_path), "--base", TINY, "-t", "-l", str(tmp_path / "logs"), *FAST,
             "lightning.trainer.max_steps=4", "model.params.loss.params.disc_start=2"],
            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    run = _only_run(tmp_path / "logs")
    assert (tmp_path / "logs" / ".jobs" / "slurm-4242").read_text() == str(run)
    _check_sync(_ranks(tmp_path), disc_start=2)
    hw = json.loads(next((run / "configs").glob("*-hardware.json")).read_text())
    assert hw["world_size"] == 2 and hw["launcher"] == "slurm"


def test_slurm_requeue_still_works_beside_our_sigusr1_checkpoint(tmp_path, monkeypatch):
    """SIGUSR1 under SLURM: Lightning saves hpc_ckpt_1.ckpt and calls `scontrol requeue <job>`, and
    our handler still writes last.ckpt at the next batch boundary."""
    from ldm_asym.train.module import AsymmetricVQGAN

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/scontrol.log\n")
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    for k, v in dict(SLURM_NTASKS="1", SLURM_NNODES="1", SLURM_NTASKS_PER_NODE="1", SLURM_PROCID="0",
                     SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_JOB_ID="777", SLURM_JOB_NAME="asym",
                     SLURM_NODELIST="127.0.0.1").items():
        monkeypatch.setenv(k, v)
    real = AsymmetricVQGAN.training_step

    def step(self, batch, batch_idx):
        out = real(self, batch, batch_idx)
        if self.global_step == 3:
            os.kill(os.getpid(), signal.SIGUSR1)
        return out

    monkeypatch.setattr(AsymmetricVQGAN, "training_step", step)
    assert main(["--base", TINY, "-t", "-l", str(tmp_path / "logs"), *FAST, "lightning.trainer.max_steps=6",
                 "lightning.callbacks.checkpoint.every_n_steps=100"]) == 0
    run = _only_run(tmp_path / "logs")
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "777"]
    assert (run / "hpc_ckpt_1.ckpt").is_file()
    assert load(run / "checkpoints" / "last.ckpt")["global_step"] == 6
    # A requeued job (same id) comes back to the same folder and resumes from its newest checkpoint.
    assert main(["--base", TINY, "-t", "-l", str(tmp_path / "logs"), *FAST, "lightning.trainer.max_steps=8"]) == 0
    assert _only_run(tmp_path / "logs") == run
    assert load(run / "checkpoints" / "last.ckpt")["global_step"] == 8
