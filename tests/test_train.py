"""Training: the loop trains, resumes exactly, counts batches, runs DDP; the CLI and configs."""

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from ldm_asym.cli import load_config, main, parse_gpus, validate
from ldm_asym.train.module import AsymmetricVQGAN, lr_factor

TINY = "configs/tiny.yaml"
QUIET = ["lightning.trainer.enable_progress_bar=false", "lightning.trainer.log_every_n_steps=1"]


def run(tmp_path, *args, base=TINY):
    assert main(["--base", base, "-t", "-l", str(tmp_path), *QUIET, *args]) == 0
    return sorted(p for p in tmp_path.iterdir() if p.is_dir())[-1]


def metrics(run_dir: Path) -> list[dict]:
    return list(csv.DictReader(open(run_dir / "metrics.csv")))


def series(rows, key):
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.mark.parametrize("blend", ["add", "concat"])
def test_tiny_trains_and_loss_falls(tmp_path, blend):
    run_dir = run(tmp_path, "lightning.trainer.max_steps=30", "lightning.trainer.limit_val_batches=0",
                  "model.params.loss.params.disc_start=1000",
                  f"model.params.autoencoder.decoder.params.blend={blend}")
    l1 = list(series(metrics(run_dir), "loss/l1").values())
    assert len(l1) == 30
    assert sum(l1[-5:]) / 5 < 0.8 * sum(l1[:5]) / 5, l1
    for sub in ("checkpoints/last.ckpt", "configs", "images/train"):
        assert (run_dir / sub).exists(), sub
    assert len(list((run_dir / "configs").glob("*-project.yaml"))) == 1
    assert len(list((run_dir / "configs").glob("*-lightning.yaml"))) == 1
    ckpt = load(run_dir / "checkpoints" / "last.ckpt")
    assert ckpt["ldm_asym"]["model_config"]["decoder"]["blend"] == blend
    assert not any(k.startswith("loss.perceptual.") for k in ckpt["state_dict"])  # LPIPS is not saved


def test_resume_mid_epoch_is_exact(tmp_path):
    """20 steps straight == 10 steps, stop, -r, 10 more: same weights, optimiser, counters, GAN start."""
    straight = run(tmp_path / "a")  # tiny: 20 steps, checkpoint every 10, GAN from step 11
    # An interrupted run: the same configs with only the step-10 checkpoint as last.ckpt.
    cut = tmp_path / "b" / "cut_tiny"
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "configs", cut / "configs")
    shutil.copy(straight / "checkpoints" / "step-000010.ckpt", cut / "checkpoints" / "last.ckpt")
    assert main(["-r", str(cut), "-t", *QUIET]) == 0

    a, b = load(straight / "checkpoints" / "last.ckpt"), load(cut / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 20
    assert a["ldm_asym"]["batches_seen"] == b["ldm_asym"]["batches_seen"] == 20
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    for oa, ob in zip(a["optimizer_states"], b["optimizer_states"]):
        for i, st in oa["state"].items():
            assert all(torch.equal(st[n], ob["state"][i][n]) for n in st)
    # The GAN starts at step 11 in both runs (the resumed one logged steps 10..19).
    for rows in (metrics(straight), metrics(cut)):
        factor = series(rows, "loss/disc_factor")
        assert factor.get(10, 0.0) == 0.0 and factor[11] == 1.0 and factor[19] == 1.0


def test_steps_count_batches_not_optimizer_steps(tmp_path):
    run_dir = run(tmp_path, "lightning.trainer.max_steps=12", "model.params.loss.params.disc_start=4",
                  "lightning.trainer.limit_val_batches=0", "lightning.callbacks.checkpoint.every_n_steps=6")
    ckpt = load(run_dir / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 12 and ckpt["ldm_asym"]["batches_seen"] == 12
    # D stepped on batches 4..11 (8 updates), G on all 12; Adam counts them per parameter.
    g_state, d_state = (next(iter(o["state"].values())) for o in ckpt["optimizer_states"])
    assert int(g_state["step"]) == 12 and int(d_state["step"]) == 8
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == ["step-000006.ckpt", "step-000012.ckpt"]
    assert series(metrics(run_dir), "loss/disc_factor")[3] == 0.0
    assert series(metrics(run_dir), "loss/disc_factor")[4] == 1.0


def test_parse_gpus():
    assert parse_gpus("0,1,") == {"accelerator": "gpu", "devices": [0, 1]}
    assert parse_gpus("3,") == {"accelerator": "gpu", "devices": [3]}
    assert parse_gpus("0,1,2,3") == {"accelerator": "gpu", "devices": [0, 1, 2, 3]}
    assert parse_gpus(None) == {}
    for bad in (",", "a,b"):
        with pytest.raises(ValueError):
            parse_gpus(bad)


def test_config_merging_inherit_and_dotlist():
    cfg = OmegaConf.merge(load_config("configs/asym_large_2x.yaml"), load_config("configs/ablations/blend_concat.yaml"),
                          OmegaConf.from_dotlist(["lightning.trainer.max_steps=100", "paths.imagenet=/x"]))
    dec = cfg.model.params.autoencoder.decoder.params
    assert list(dec.up_widths) == [1024, 1024, 512, 256] and dec.resnets_per_level == 6 and dec.blend == "concat"
    assert cfg.data.params.batch_size == 2 and cfg.model.params.base_learning_rate == 4.5e-6  # from the base
    assert cfg.lightning.trainer.max_steps == 100 and cfg.data.params.train.params.root == "/x"
    validate(cfg)


def test_presets_build_the_paper_decoders():
    from ldm_asym.models import AsymmetricDecoder

    for name, expected in (("asym_base", 60_276_227), ("asym_large_1.5x", 160_136_835), ("asym_large_2x", 371_966_467)):
        params = OmegaConf.to_container(load_config(f"configs/{name}.yaml").model.params.autoencoder.decoder.params)
        with torch.device("meta"):
            dec = AsymmetricDecoder(**params)
        assert sum(p.numel() for p in dec.parameters()) == expected, name


@pytest.mark.parametrize("override,match", [
    ("model.params.autoencoder.decoder.params.blnd=add", "blnd"),
    ("model.params.lerning_rate=1", "lerning_rate"),
    ("lightning.trainer.max_stepz=3", "max_stepz"),
    ("modle.params.x=1", "modle"),
    ("data.params.train.target=ldm_asym.data.NoSuchDataset", "NoSuchDataset"),
])
def test_unknown_config_keys_are_reported(tmp_path, override, match):
    with pytest.raises(ValueError, match=match):
        main(["--base", TINY, "-t", "-l", str(tmp_path), override])
    assert not any(tmp_path.iterdir())  # nothing written


def test_missing_paths_fail_before_work(tmp_path):
    with pytest.raises(FileNotFoundError, match="SD VAE not found"):
        main(["--base", "configs/asym_base.yaml", "-t", "-l", str(tmp_path), "paths.sd_vae=/nonexistent/vae"])
    with pytest.raises(FileNotFoundError, match="train data folder not found: /nonexistent/imagenet"):
        main(["--base", "configs/asym_base.yaml", "-t", "-l", str(tmp_path), "paths.imagenet=/nonexistent/imagenet"])


def test_missing_vgg_weights_stop_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):
        main(["--base", TINY, "-t", "-l", str(tmp_path / "logs"), "model.params.loss.params.lpips_pretrained=true"])


def test_lr_formula_and_schedule():
    cfg = OmegaConf.to_container(load_config(TINY).model.params, resolve=True)
    cfg.update(base_learning_rate=1e-5, scale_lr=True, accumulate_grad_batches=3, pretrained_lr_scale=0.1)
    module = AsymmetricVQGAN(**cfg)
    module.pretrained_names = ["conv_in.weight"]
    module._trainer = SimpleNamespace(world_size=8, datamodule=SimpleNamespace(batch_size=10), max_steps=100)
    opt_g, _ = module.configure_optimizers()
    assert module.lr == pytest.approx(8 * 10 * 3 * 1e-5)
    scales = {g["name"]: g["lr_scale"] for g in opt_g.param_groups}
    assert scales == {"new": 1.0, "pretrained": 0.1}
    # warm-up x0.01 -> x1, then cosine to the floor
    assert lr_factor(0, 10, 100, 0.01, 0.0) == pytest.approx(0.01)
    assert lr_factor(10, 10, 100, 0.01, 0.0) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100, 0.01, 0.0) == pytest.approx(0.5)
    assert lr_factor(100, 10, 100, 0.01, 0.1) == pytest.approx(0.1)
    module.hparams.scale_lr = False
    module.configure_optimizers()
    assert module.lr == pytest.approx(1e-5)


def test_lr_scales_give_named_parameters_their_own_group():
    """The fast start's per-group lr: conv_out leaves the pretrained group for one at x1.0; a prefix
    that matches nothing is named, not silently ignored."""
    cfg = OmegaConf.to_container(load_config(TINY).model.params, resolve=True)
    cfg.update(base_learning_rate=1e-3, scale_lr=False, pretrained_lr_scale=0.1, lr_scales={"conv_out.": 1.0})
    module = AsymmetricVQGAN(**cfg)
    module.pretrained_names = sorted(module.model.decoder.sd_parameter_names())
    module._trainer = SimpleNamespace(world_size=1, datamodule=SimpleNamespace(batch_size=2), max_steps=10)
    opt_g, _ = module.configure_optimizers()
    groups = {g["name"]: g for g in opt_g.param_groups}
    assert {k: g["lr_scale"] for k, g in groups.items()} == {"new": 1.0, "pretrained": 0.1, "conv_out.": 1.0}
    dec = module.model.decoder
    assert {id(p) for p in groups["conv_out."]["params"]} == {id(dec.conv_out.weight), id(dec.conv_out.bias)}
    assert sum(len(g["params"]) for g in opt_g.param_groups) == len(list(dec.parameters()))
    module._set_lr(opt_g, 1e-3)
    assert groups["conv_out."]["lr"] == pytest.approx(1e-3) and groups["pretrained"]["lr"] == pytest.approx(1e-4)
    module.hparams.lr_scales = {"conv_outt.": 1.0}
    with pytest.raises(ValueError, match="lr_scales.*conv_outt"):
        module.configure_optimizers()


def test_fast_start_merges_on_the_base_config_without_touching_the_architecture():
    base = load_config("configs/asym_base.yaml")
    cfg = OmegaConf.merge(base, load_config("configs/ablations/fast_start.yaml"))
    assert cfg.model.params.autoencoder == base.model.params.autoencoder  # same layers and shapes
    assert cfg.model.params.lr_scales == {"conv_out.": 1.0, "conv_norm_out.": 1.0, "condition_encoder.layers.0.": 3.0}
    assert cfg.model.params.loss.params.known_pixel_weight > 0
    assert cfg.model.params.loss.params.perceptual_weight == 1.0  # the paper's loss is kept


@pytest.mark.parametrize("logger", ["TensorBoardLogger", "WandbLogger"])
def test_loggers_receive_metrics_and_image_grids(tmp_path, monkeypatch, logger):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = run(tmp_path, f"lightning.logger.target=pytorch_lightning.loggers.{logger}",
                  "lightning.trainer.max_steps=2", "lightning.callbacks.images.every_n_steps=2",
                  "lightning.trainer.limit_val_batches=0")
    assert (run_dir / "images" / "train" / "step-000002.png").is_file()
    if logger == "TensorBoardLogger":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(run_dir), size_guidance={"images": 0}).Reload()
        assert "train/comparison" in events.Tags()["images"]
        assert "loss/l1" in events.Tags()["scalars"]
    else:
        runs = list((run_dir / "wandb").glob("offline-run-*/*.wandb"))
        assert len(runs) == 1 and runs[0].stat().st_size > 0


@pytest.mark.parametrize("init_decoder", [True, False])
def test_init_from_sd_vae(tmp_path, init_decoder):
    """Encoder and quant convs come from the VAE; with init_decoder_from_vae the SD-shaped decoder
    part too (trained at lr x pretrained_lr_scale) while the branch starts fresh."""
    from conftest import TINY_VAE, make_vae

    vae = make_vae(TINY_VAE)
    vae.save_pretrained(tmp_path / "vae")
    cfg = OmegaConf.to_container(load_config(TINY).model.params, resolve=True)
    cfg["autoencoder"]["decoder"]["params"]["up_widths"] = [64, 64, 32, 32]  # mirrors the VAE
    cfg.update(vae_source=str(tmp_path / "vae"), init_decoder_from_vae=init_decoder)
    module = AsymmetricVQGAN(**cfg)
    ref = vae.state_dict()
    for k, v in module.model.state_dict().items():
        if not k.startswith("decoder."):
            assert torch.equal(v, ref[k]), k
    dec = module.model.decoder.state_dict()
    sd_part = [k for k in dec if not k.startswith("condition_encoder.")]
    same = [torch.equal(dec[k], ref["decoder." + k]) for k in sd_part]
    assert all(same) if init_decoder else not any(same[:5])
    assert len(module.pretrained_names) == (len([n for n, _ in module.model.decoder.named_parameters()
                                                   if not n.startswith("condition_encoder.")]) if init_decoder else 0)


def test_ema_decoder_is_trained_checkpointed_and_exported(tmp_path):
    from ldm_asym import load_autoencoder

    run_dir = run(tmp_path, "model.params.ema_decay=0.5", "lightning.trainer.max_steps=4",
                  "lightning.trainer.limit_val_batches=0")
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    sd = load(ckpt)["state_dict"]
    live = load_autoencoder(ckpt).decoder.state_dict()
    ema = load_autoencoder(ckpt, use_ema=True).decoder.state_dict()
    for k in live:
        assert torch.equal(ema[k], sd["ema_decoder." + k]), k
    assert any(not torch.equal(live[k], ema[k]) for k in live)
    with pytest.raises(ValueError, match="no EMA weights"):
        load_autoencoder(run(tmp_path / "plain", "lightning.trainer.max_steps=1",
                             "lightning.trainer.limit_val_batches=0") / "checkpoints" / "last.ckpt", use_ema=True)


# ---------------------------------------------------------------------- issue 10: loop at scale
def test_integer_val_check_interval_spans_epochs(tmp_path):
    """An epoch of 2 batches, validation every 5: Lightning aborts unless the interval counts batches
    across epochs (check_val_every_n_epoch=None, which the CLI sets for integer intervals)."""
    run_dir = run(tmp_path, "data.params.train.params.n_crops=8", "lightning.trainer.val_check_interval=5",
                  "lightning.trainer.max_steps=6", "lightning.callbacks.checkpoint.every_n_steps=100")
    val = series(metrics(run_dir), "val/l1")
    assert list(val) == [4]  # after the 5th batch (Lightning logs it at step index 4), in epoch 2


def test_resume_on_another_world_size_is_refused_or_explicit(tmp_path, capsys):
    run_dir = run(tmp_path, "lightning.trainer.max_steps=3", "lightning.trainer.limit_val_batches=0",
                  "lightning.trainer.devices=auto", "model.params.scale_lr=true", "model.params.base_learning_rate=1e-5")
    saved = OmegaConf.load(next((run_dir / "configs").glob("*-lightning.yaml"))).lightning.trainer
    assert (saved.accelerator, saved.devices, saved.num_nodes) == ("cpu", 1, 1)  # "auto", as resolved
    with pytest.raises(ValueError, match=r"world size changed: .* trained on 1 process\(es\) x batch 4; resuming on 2 "
                                         r"changes the lr from 4e-05 to 8e-05.*--allow-new-world-size"):
        main(["-r", str(run_dir), "-t", *QUIET, "lightning.trainer.devices=2", "lightning.trainer.max_steps=5"])
    # Allowed explicitly: 2 processes continue the same epoch's permutation at the same sample.
    cmd = [sys.executable, "main.py", "-r", str(run_dir), "-t", "--allow-new-world-size", *QUIET,
           "lightning.trainer.devices=2", "lightning.trainer.max_steps=5", "lightning.trainer.limit_val_batches=0"]
    env = {k: v for k, v in os.environ.items() if k not in ("LDM_ASYM_RUN_DIR", "LOCAL_RANK")}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "--allow-new-world-size: " in out.stdout and "lr from 4e-05 to 8e-05" in out.stdout
    final = load(run_dir / "checkpoints" / "last.ckpt")
    assert final["global_step"] == 5 and final["ldm_asym"]["hardware"]["world_size"] == 2
    assert final["ldm_asym"]["epoch_samples"] == 3 * 4 + 2 * 8


def test_sampler_position_is_the_same_sample_on_any_world_size():
    from ldm_asym.train.data import ResumableSampler

    one = ResumableSampler(50, seed=3, rank=0, world_size=1)
    order = [i for i, _ in one]
    consumed = 3 * 4  # 3 batches of 4 on one process
    rest = []
    for rank in (0, 1):
        s = ResumableSampler(50, seed=3, rank=rank, world_size=2)
        s.start = consumed
        rest.append([i for i, _ in s])
    assert len(rest[0]) == len(rest[1]) == (50 - consumed) // 2
    assert sorted(rest[0] + rest[1]) == sorted(order[consumed:consumed + 2 * len(rest[0])])
    # Same world size: exactly the uninterrupted rank's tail.
    s = ResumableSampler(50, seed=3, rank=1, world_size=2)
    full = [i for i, _ in s]
    s.start = 2 * 5
    assert [i for i, _ in s] == full[5:]


def _paused(fn, state):
    def run(*args, **kwargs):
        on, state["on"] = state["on"], False
        try:
            return fn(*args, **kwargs)
        finally:
            state["on"] = on
    return run


def test_no_host_sync_outside_logging_steps(tmp_path, monkeypatch):
    """.item(), bool(tensor), .tolist(), .cpu(), float()/int() of a tensor block the host until the
    GPU catches up. Count them from one batch start to the next (data loading excluded): only
    logging batches may have any."""
    calls, state = {}, {"on": False, "batch": 0}
    for name in ("item", "__bool__", "tolist", "cpu", "__float__", "__int__", "numpy"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name, **k):
            if state["on"]:
                calls.setdefault(state["batch"], []).append(_name)
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    # Not counted: loading the next batch (sampler, dataset, collate), writing the final checkpoint and
    # the image grids (their own interval).
    from torch.utils.data.dataloader import _BaseDataLoaderIter

    from ldm_asym.train.callbacks import ImageLogger

    for cls, name in ((_BaseDataLoaderIter, "__next__"), (AsymmetricVQGAN, "on_save_checkpoint"),
                      (ImageLogger, "_write")):
        monkeypatch.setattr(cls, name, _paused(getattr(cls, name), state))

    def on_train_batch_start(self, batch, batch_idx):
        state["on"], state["batch"] = True, self._batches_seen + 1

    monkeypatch.setattr(AsymmetricVQGAN, "on_train_batch_start", on_train_batch_start, raising=False)
    monkeypatch.setattr(AsymmetricVQGAN, "on_train_end", lambda self: state.update(on=False), raising=False)
    assert main(["--base", TINY, "-t", "-l", str(tmp_path), "lightning.trainer.log_every_n_steps=4",
                 "lightning.trainer.enable_progress_bar=true", "lightning.trainer.max_steps=5",
                 "lightning.trainer.limit_val_batches=0", "model.params.loss.params.disc_start=2",
                 "model.params.accumulate_grad_batches=2", "lightning.callbacks.checkpoint.every_n_steps=100",
                 "lightning.callbacks.images.every_n_steps=100"]) == 0
    syncing = {b: c for b, c in calls.items() if b % 4 != 0}
    assert not syncing, syncing
    assert any(calls.get(b) for b in (4, 8))  # the logging batches do read values (the test can see them)


def test_compile_keeps_the_output_conv_out_of_the_graph():
    """The adaptive GAN weight's gradient w.r.t. conv_out.weight must not run the compiled backward."""
    from ldm_asym.models import AsymmetricDecoder

    dec = AsymmetricDecoder(up_widths=[32, 32, 16, 16], resnets_per_level=1, norm_num_groups=8)
    dec.compile_features(backend="aot_eager")
    z, x = torch.randn(1, 4, 4, 4), torch.rand(1, 3, 32, 32) * 2 - 1
    m = (torch.rand(1, 1, 32, 32) > 0.5).float()
    out = dec(z, x, m)
    assert type(out.grad_fn).__name__.startswith("Convolution")
    compiled = out.grad_fn.next_functions[0][0]
    assert "Compiled" in type(compiled).__name__
    runs = []
    compiled.register_prehook(lambda grads: runs.append(1))
    torch.autograd.grad(out.square().mean(), dec.conv_out.weight, retain_graph=True)
    assert not runs  # only conv_out's own weight gradient
    out.square().mean().backward()
    assert runs == [1]
    assert not any(k.startswith("_orig") or "compile" in k for k in dec.state_dict())  # names unchanged


def test_fp16_precision_is_refused_with_the_fast_path_named(tmp_path):
    for precision in ("16-mixed", "16"):
        with pytest.raises(ValueError, match=f"precision={precision} is not supported.*bf16-mixed"):
            main(["--base", TINY, "-t", "-l", str(tmp_path), *QUIET, f"lightning.trainer.precision={precision}"])
    assert not any(tmp_path.iterdir())  # refused before any work


def test_bf16_mixed_clips_with_fused_adam(tmp_path, monkeypatch):
    norms = []
    real = torch.nn.utils.clip_grad_norm_

    def clip(params, max_norm, *a, **k):
        params = list(params)
        total = real(params, max_norm, *a, **k)
        after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
        norms.append((float(total), float(after)))
        return total

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    run_dir = run(tmp_path, "lightning.trainer.precision=bf16-mixed", "model.params.gradient_clip_val=0.01",
                  "lightning.trainer.max_steps=4", "model.params.loss.params.disc_start=2",
                  "lightning.trainer.limit_val_batches=0")
    ckpt = load(run_dir / "checkpoints" / "last.ckpt")
    assert all(o["param_groups"][0]["fused"] for o in ckpt["optimizer_states"])
    assert len(norms) == 4 + 2  # G every step, D from disc_start
    assert all(after <= 0.01 * 1.001 for _, after in norms) and any(total > 0.01 for total, _ in norms)


def test_accumulation_checkpoint_inside_a_window_resumes_exactly(tmp_path, monkeypatch):
    """accumulate 2: a checkpoint after the 5th batch (mid-window) replays that window on resume,
    so the result matches the uninterrupted run bit for bit."""
    args = ["lightning.trainer.max_steps=5", "model.params.accumulate_grad_batches=2",
            "model.params.loss.params.disc_start=2", "lightning.trainer.limit_val_batches=0",
            "lightning.callbacks.checkpoint.every_n_steps=100"]
    straight = run(tmp_path / "a", *args)
    real = AsymmetricVQGAN.training_step
    mid = tmp_path / "mid.ckpt"

    def step(self, batch, batch_idx):
        out = real(self, batch, batch_idx)
        if self._batches_seen == 5:
            self.trainer.save_checkpoint(mid)
            self.trainer.should_stop = True
        return out

    monkeypatch.setattr(AsymmetricVQGAN, "training_step", step)
    cut = run(tmp_path / "b", *args)
    monkeypatch.setattr(AsymmetricVQGAN, "training_step", real)
    assert load(mid)["ldm_asym"]["micro_batches"] == 4  # the window's start
    (cut / "checkpoints" / "last.ckpt").unlink()
    shutil.copy(mid, cut / "checkpoints" / "last.ckpt")
    assert main(["-r", str(cut), "-t", *QUIET]) == 0
    a, b = load(straight / "checkpoints" / "last.ckpt"), load(cut / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 5 and b["ldm_asym"]["batches_seen"] == 10
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k


def test_a_failed_resume_leaves_the_run_resumable_exactly(tmp_path):
    """-r with an override that breaks the first step: last.ckpt and the run's configs stay as they
    were, so a plain -r afterwards matches the uninterrupted run bit for bit."""
    straight = run(tmp_path / "a")
    cut = tmp_path / "b" / "cut_tiny"
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "configs", cut / "configs")
    shutil.copy(straight / "checkpoints" / "step-000010.ckpt", cut / "checkpoints" / "last.ckpt")
    configs = sorted(p.name for p in (cut / "configs").iterdir())
    with pytest.raises((RuntimeError, ValueError)):  # 60 px crops do not fit the 8x latent grid
        main(["-r", str(cut), "-t", *QUIET, "data.params.train.params.size=60"])
    assert sorted(p.name for p in (cut / "configs").iterdir()) == configs  # the bad override was not kept
    assert load(cut / "checkpoints" / "last.ckpt")["global_step"] == 10
    assert (cut / "checkpoints" / "exception.ckpt").is_file()
    assert main(["-r", str(cut), "-t", *QUIET]) == 0
    a, b = load(straight / "checkpoints" / "last.ckpt"), load(cut / "checkpoints" / "last.ckpt")
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k


@pytest.mark.parametrize("damage", ["truncated", "empty", "text"])
def test_a_damaged_last_ckpt_names_the_file_and_falls_back(tmp_path, damage, capsys):
    run_dir = run(tmp_path, "lightning.trainer.max_steps=4", "lightning.callbacks.checkpoint.every_n_steps=2",
                  "lightning.trainer.limit_val_batches=0")
    last = run_dir / "checkpoints" / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes({"truncated": data[: len(data) // 3], "empty": b"", "text": b"not a checkpoint\n"}[damage])
    with pytest.raises(ValueError, match=f"cannot resume from {last}.*newest intact checkpoint is .*step-000004.ckpt"):
        main(["-r", str(last), "-t", *QUIET])
    assert main(["-r", str(run_dir), "-t", *QUIET, "lightning.trainer.max_steps=6",
                 "lightning.trainer.limit_val_batches=0"]) == 0
    assert f"cannot resume from {last}" in capsys.readouterr().out
    assert load(last)["global_step"] == 6  # continued from step-000004.ckpt


def test_resume_from_a_checkpoint_outside_a_run_folder(tmp_path):
    run_dir = run(tmp_path / "a", "lightning.trainer.max_steps=2", "lightning.trainer.limit_val_batches=0")
    lone = tmp_path / "lone.ckpt"
    shutil.copy(run_dir / "checkpoints" / "last.ckpt", lone)
    with pytest.raises(SystemExit):
        main(["-r", str(lone), "-t", *QUIET])
    assert main(["-r", str(lone), "--base", TINY, "-t", "-l", str(tmp_path / "b"), *QUIET,
                 "lightning.trainer.max_steps=4", "lightning.trainer.limit_val_batches=0"]) == 0
    new_run = next((tmp_path / "b").iterdir())
    assert load(new_run / "checkpoints" / "last.ckpt")["global_step"] == 4


# ---------------------------------------------------------------------- issue 13: validation metrics
def test_val_metrics_are_means_over_images_across_batches(one_thread):
    """5 images in batches of 3 and 2, two with an empty region: each logged value is the mean of the
    per-image values over the images where it is defined (a mean of batch nanmeans would differ)."""
    import pytorch_lightning as pl

    from ldm_asym import metrics as M

    torch.manual_seed(0)
    module = AsymmetricVQGAN(**OmegaConf.to_container(OmegaConf.load(TINY).model.params))
    g = torch.Generator().manual_seed(0)
    images = torch.rand(5, 3, 32, 32, generator=g) * 2 - 1
    masks = torch.zeros(5, 1, 32, 32)
    masks[1] = 1  # no known pixel: psnr_known and unmasked_error undefined
    masks[2:, :, 4:20, 8:24] = 1  # image 0 keeps no hole: psnr_hole undefined
    data = [{"image": images[i], "mask": masks[i]} for i in range(5)]
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    logged = trainer.validate(module, torch.utils.data.DataLoader(data, batch_size=3), verbose=False)[0]

    with torch.no_grad():
        rec = module.model.decode(module.model.encode(images).mode(), image=images, mask=masks).float().clamp(-1, 1)
        per_image = {"psnr_known": M.psnr(images, rec, M.known_region(masks)),
                     "psnr_hole": M.psnr(images, rec, M.hole_region(masks)),
                     "unmasked_error": M.unmasked_error(images, rec, masks),
                     "l1": (images - rec).abs().mean(dim=(1, 2, 3))}
    for key, values in per_image.items():
        assert logged[f"val/{key}"] == pytest.approx(torch.nanmean(values).item(), rel=1e-5), key
    assert per_image["psnr_hole"][0].isnan() and per_image["psnr_known"][1].isnan()
    batch_means = (3 * torch.nanmean(per_image["psnr_hole"][:3]) + 2 * torch.nanmean(per_image["psnr_hole"][3:])) / 5
    assert abs(batch_means.item() - logged["val/psnr_hole"]) > 1e-3  # the test tells the two apart
    assert not any(k.startswith("val_metrics") for k in module.state_dict())  # checkpoints unchanged
