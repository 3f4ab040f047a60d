"""Faults: kills during and between checkpoint writes, NaN steps, dying ranks, two nodes, full disks,
bad configs. Each test fails without the handling it names."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from ldm_asym.cli import main
from ldm_asym.train.checkpoint_io import CheckpointWriteError
from ldm_asym.train.module import NonFiniteTrainingError

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs/tiny.yaml")
FAST = ["lightning.trainer.enable_progress_bar=false", "lightning.trainer.limit_val_batches=0",
        "lightning.trainer.log_every_n_steps=1"]

# Runs main.py with a fault injected by environment variables (children of DDP re-run this file too).
WRAPPER = textwrap.dedent('''
    import os, signal, sys
    import torch
    sys.path.insert(0, os.environ["REPO"])
    from ldm_asym.train.module import AsymmetricVQGAN

    die_step, die_rank = int(os.environ.get("DIE_AT_STEP", -1)), int(os.environ.get("DIE_RANK", 0))
    die_save, saves = int(os.environ.get("DIE_AT_SAVE", -1)), [0]
    real_save, real_step = torch.save, AsymmetricVQGAN.training_step

    def save(obj, f, *a, **k):
        saves[0] += 1
        if saves[0] == die_save and hasattr(f, "write"):
            f.write(b"half a checkpoint" * 4096)
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *a, **k)

    def step(self, batch, batch_idx):
        if self.global_step == die_step and self.global_rank == die_rank:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_step(self, batch, batch_idx)

    torch.save, AsymmetricVQGAN.training_step = save, step
    from ldm_asym.cli import main
    sys.exit(main(sys.argv[1:]))
''')


def wrapper(tmp_path) -> str:
    path = tmp_path / "faulty_main.py"
    path.write_text(WRAPPER)
    return str(path)


def run_script(script, args, env_extra=None, timeout=300, cwd=REPO):
    env = {k: v for k, v in os.environ.items() if k not in ("LDM_ASYM_RUN_DIR", "LOCAL_RANK", "NODE_RANK")}
    env.update(REPO=str(REPO), PYTHONUNBUFFERED="1", **(env_extra or {}))
    return subprocess.run([sys.executable, script, *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def only_run(logdir: Path) -> Path:
    runs = [p for p in logdir.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 20-step tiny run (checkpoint every 5) to compare against."""
    logdir = tmp_path_factory.mktemp("straight")
    assert main(["--base", TINY, "-t", "-l", str(logdir), *FAST, "lightning.callbacks.checkpoint.every_n_steps=5"]) == 0
    return load(only_run(logdir) / "checkpoints" / "last.ckpt")


@pytest.mark.parametrize("fault", ["kill_while_saving", "kill_between_saves"])
def test_kill_minus_9_then_resume_matches_straight_run(tmp_path, straight, fault):
    script = wrapper(tmp_path)
    # Saves come in pairs (step-N.ckpt, last.ckpt) every 5 steps: the 4th save is last.ckpt at step 10.
    env = {"DIE_AT_SAVE": "4"} if fault == "kill_while_saving" else {"DIE_AT_STEP": "13"}
    out = run_script(script, ["--base", TINY, "-t", "-l", str(tmp_path / "logs"), *FAST,
                              "lightning.callbacks.checkpoint.every_n_steps=5"], env)
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    run = only_run(tmp_path / "logs")
    last = load(run / "checkpoints" / "last.ckpt")  # the previous good one, never a torn file
    assert last["global_step"] == (5 if fault == "kill_while_saving" else 10)
    out = run_script(script, ["-r", str(run), "-t", *FAST])
    assert out.returncode == 0, out.stderr[-3000:]
    final = load(run / "checkpoints" / "last.ckpt")
    assert final["global_step"] == 20
    for k, v in straight["state_dict"].items():
        assert torch.equal(v, final["state_dict"][k]), k
    assert not list((run / "checkpoints").glob(".*.tmp")) or fault == "kill_while_saving"


def _nan_after(monkeypatch, bad_steps):
    from ldm_asym.losses import AsymLoss

    real = AsymLoss.generator_loss

    def generator_loss(self, inputs, reconstructions, posterior=None, step=0, **kwargs):
        loss, log = real(self, inputs, reconstructions, posterior, step=step, **kwargs)
        return (loss * float("nan"), log) if bad_steps(step) else (loss, log)

    monkeypatch.setattr(AsymLoss, "generator_loss", generator_loss)


def test_nonfinite_updates_are_dropped_counted_and_saved_once(tmp_path, monkeypatch):
    import warnings

    _nan_after(monkeypatch, lambda s: s in (5, 6))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        main(["--base", TINY, "-t", "-l", str(tmp_path), *FAST, "lightning.trainer.max_steps=12",
              "lightning.callbacks.checkpoint.every_n_steps=5"])
    run = only_run(tmp_path)
    ckpt = load(run / "checkpoints" / "last.ckpt")
    # A dropped update still counts as a step (as with fp16's GradScaler); both are counted.
    assert ckpt["global_step"] == 12 and ckpt["ldm_asym"]["batches_seen"] == 12
    assert ckpt["ldm_asym"]["nonfinite_counts"] == [0, 0, 2, 0]  # G run, D run, G total, D total
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    # One file for the one run of bad updates, holding the weights from before it: step 5 was dropped.
    assert sum("non-finite generator" in str(w.message) for w in seen) == 1
    before = load(run / "checkpoints" / "before-nonfinite.ckpt")
    good = load(run / "checkpoints" / "step-000005.ckpt")
    for k, v in good["state_dict"].items():
        assert torch.equal(v, before["state_dict"][k]), k
    rows = (run / "metrics.csv").read_text()
    assert "train/nonfinite_skipped_g" in rows


def test_too_many_nonfinite_steps_stop_with_good_checkpoint(tmp_path, monkeypatch):
    _nan_after(monkeypatch, lambda s: s >= 4)
    with pytest.raises(NonFiniteTrainingError, match="3 non-finite generator updates in a row"):
        main(["--base", TINY, "-t", "-l", str(tmp_path), *FAST, "model.params.max_nonfinite_steps=3"])
    run = only_run(tmp_path)
    before = load(run / "checkpoints" / "before-nonfinite.ckpt")
    assert before["global_step"] == 5  # saved at the check of the first bad step (4), which was dropped
    assert all(torch.isfinite(v).all() for v in before["state_dict"].values() if v.is_floating_point())


def test_too_many_nonfinite_discriminator_updates_stop_too(tmp_path, monkeypatch):
    """D's bad updates are counted on their own: a good G step in the same batch does not reset them."""
    from ldm_asym.losses import AsymLoss

    real = AsymLoss.discriminator_loss

    def discriminator_loss(self, inputs, reconstructions, step=0):
        loss, log = real(self, inputs, reconstructions, step=step)
        return loss * float("nan"), log

    monkeypatch.setattr(AsymLoss, "discriminator_loss", discriminator_loss)
    with pytest.raises(NonFiniteTrainingError, match="3 non-finite discriminator updates in a row"):
        main(["--base", TINY, "-t", "-l", str(tmp_path), *FAST, "model.params.max_nonfinite_steps=3",
              "model.params.loss.params.disc_start=2"])
    before = load(only_run(tmp_path) / "checkpoints" / "before-nonfinite.ckpt")
    assert before["ldm_asym"]["nonfinite_counts"] == [0, 1, 0, 1]


def _ddp_args(logdir, steps=6):
    return ["--base", TINY, "-t", "-l", str(logdir), *FAST, "lightning.trainer.accelerator=cpu",
            "lightning.trainer.devices=2", f"lightning.trainer.max_steps={steps}", "lightning.ddp_timeout_s=60"]


@pytest.mark.parametrize("dying_rank", [1, 0])
def test_a_dying_rank_ends_every_rank(tmp_path, dying_rank):
    script = wrapper(tmp_path)
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, script, *_ddp_args(tmp_path / "logs", steps=50)], cwd=REPO,
                            env={**{k: v for k, v in os.environ.items() if k != "LOCAL_RANK"}, "REPO": str(REPO),
                                 "DIE_AT_STEP": "2", "DIE_RANK": str(dying_rank)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert proc.wait(timeout=240) != 0
    # No rank may outlive the failure: look for any process still running this script.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        alive = subprocess.run(["pgrep", "-f", script], capture_output=True, text=True).stdout.split()
        if not alive:
            break
        time.sleep(1)
    assert not alive, f"ranks still running after {time.monotonic() - start:.0f} s"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_one_machine_train_checkpoint_resume(tmp_path):
    def launch(args):
        port = str(_free_port())
        procs = []
        for node in (0, 1):
            env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "LDM_ASYM_RUN_DIR")}
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=str(node), PYTHONUNBUFFERED="1")
            procs.append(subprocess.Popen([sys.executable, "main.py", *args], cwd=REPO, env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        outs = [p.communicate(timeout=300)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]

    nodes = ["lightning.trainer.accelerator=cpu", "lightning.trainer.devices=1", "lightning.trainer.num_nodes=2"]
    launch(["--base", TINY, "-t", "-l", str(tmp_path / "logs"), *FAST, *nodes, "lightning.trainer.max_steps=4",
            "-n", "twonode"])
    run = next(p for p in (tmp_path / "logs").iterdir() if (p / "checkpoints" / "last.ckpt").exists())
    assert load(run / "checkpoints" / "last.ckpt")["global_step"] == 4
    launch(["-r", str(run), "-t", *FAST, *nodes, "lightning.trainer.max_steps=8"])
    assert load(run / "checkpoints" / "last.ckpt")["global_step"] == 8


def test_disk_full_at_save_keeps_previous_checkpoints(tmp_path, monkeypatch):
    import errno

    import ldm_asym.train.checkpoint_io as cio

    real, calls = torch.save, [0]

    def save(obj, f, *a, **k):
        calls[0] += 1
        if calls[0] >= 3:  # step-10 / last at step 10 fail; step 5's files were written
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(cio.torch, "save", save)
    with pytest.raises(CheckpointWriteError, match="No space left on device.*intact"):
        main(["--base", TINY, "-t", "-l", str(tmp_path), *FAST, "lightning.callbacks.checkpoint.every_n_steps=5"])
    ckpts = only_run(tmp_path) / "checkpoints"
    assert load(ckpts / "last.ckpt")["global_step"] == 5
    assert load(ckpts / "step-000005.ckpt")["global_step"] == 5
    assert not list(ckpts.glob(".*tmp*"))


def test_unwritable_or_full_log_dir_fails_before_training(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match="cannot write the run folder"):
        main(["--base", TINY, "-t", "-l", str(blocker / "logs"), *FAST])
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(OSError, match="GiB free"):
        main(["--base", TINY, "-t", "-l", str(tmp_path / "logs"), *FAST])
    assert not list((tmp_path / "logs").glob("*/checkpoints/*"))


@pytest.mark.parametrize("override,match", [
    ("model.params.autoencoder.decoder.params.blend=ad", "must be one of add, concat, none"),
    ("data.params.batch_size=ten", "batch_size: must be an integer"),
    ("model.params.loss.params.disc_start=soon", "disc_start: must be an integer"),
])
def test_bad_config_values_reported_before_data_or_weights(tmp_path, monkeypatch, override, match):
    import ldm_asym.data.datasets as ds

    monkeypatch.setattr(ds.SkimageDataset, "__init__", lambda *a, **k: pytest.fail("data was loaded"))
    with pytest.raises(ValueError, match=match):
        main(["--base", TINY, "-t", "-l", str(tmp_path), override])


def test_missing_target_reported(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(Path(TINY).read_text().replace("target: ldm_asym.data.SkimageDataset\n      params: {split: val",
                                                  "params: {split: val"))
    with pytest.raises(ValueError, match="validation: has params but no 'target'"):
        main(["--base", str(cfg), "-t", "-l", str(tmp_path / "logs")])
