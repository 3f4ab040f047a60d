"""Hostile configs, checkpoints and model folders: a clear error that names the key or the file,
never a crash, a silent wrong result or misleading advice (issue #11).

Config errors must fire before any data or weights load: `DataModule.build` and weight reading
are blocked, so a check that comes too late fails the test instead of passing slowly.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import ASYM_CONFIGS, TINY_VAE, make_asym, make_vae

import corpus_configs as corpus
from ldm_asym import load_autoencoder
from ldm_asym.cli import main

TINY = str(corpus.TINY)


@pytest.fixture
def no_data_no_weights(monkeypatch):
    """Fail loudly if a config error slips past validation into data or weight loading."""
    import ldm_asym.interop as interop
    from ldm_asym.train.data import DataModule

    monkeypatch.setattr(DataModule, "build", lambda self: pytest.fail("data was loaded before the config error"))
    monkeypatch.setattr(interop, "load_weights", lambda *a, **k: pytest.fail("weights were loaded before the error"))


def run_cli(tmp_path, bases, *overrides):
    return main(["--base", *map(str, bases), "-t", "-l", str(tmp_path / "logs"), *overrides])


# ---------------------------------------------------------------------- dotlist overrides on tiny.yaml
AE = "model.params.autoencoder"
TRAIN_MASKS = "data.params.train.params.masks"
VAL_MASKS = "data.params.validation.params.masks"
OVERRIDE_CASES = [
    # lightning.callbacks: keys build_trainer reads, and their types
    ("ckpt_every_n_step_typo", "lightning.callbacks.checkpoint.every_n_step=5",
     r"lightning\.callbacks\.checkpoint\.every_n_step: unknown key \(valid: every_n_steps\)"),
    ("ckpt_every_n_steps_text", "lightning.callbacks.checkpoint.every_n_steps=ten",
     r"checkpoint\.every_n_steps: must be an integer; got 'ten'"),
    ("ckpt_every_n_steps_float", "lightning.callbacks.checkpoint.every_n_steps=2.5",
     r"checkpoint\.every_n_steps: must be an integer"),
    ("ckpt_every_n_steps_null", "lightning.callbacks.checkpoint.every_n_steps=null",
     r"checkpoint\.every_n_steps: must be an integer; got None"),
    ("ckpt_not_mapping", "lightning.callbacks.checkpoint=5", r"lightning\.callbacks\.checkpoint: must be a mapping"),
    ("images_max_image_typo", "lightning.callbacks.images.max_image=2",
     r"lightning\.callbacks\.images\.max_image: unknown key \(valid: every_n_steps, max_images\)"),
    ("images_every_text", "lightning.callbacks.images.every_n_steps=often",
     r"images\.every_n_steps: must be an integer; got 'often'"),
    ("images_max_bool", "lightning.callbacks.images.max_images=true", r"images\.max_images: must be an integer"),
    ("callbacks_not_mapping", "lightning.callbacks=every_step", r"lightning\.callbacks: must be a mapping"),
    # lightning.trainer: Trainer argument types
    ("trainer_max_steps_text", "lightning.trainer.max_steps=ten",
     r"lightning\.trainer\.max_steps: must be an integer; got 'ten'"),
    ("trainer_max_steps_float", "lightning.trainer.max_steps=1.5", r"lightning\.trainer\.max_steps: must be an integer"),
    ("trainer_precision_choice", "lightning.trainer.precision=33", r"lightning\.trainer\.precision: must be one of"),
    ("trainer_summary_text", "lightning.trainer.enable_model_summary=maybe",
     r"lightning\.trainer\.enable_model_summary: must be true or false"),
    ("trainer_limit_val_text", "lightning.trainer.limit_val_batches=all", r"lightning\.trainer\.limit_val_batches"),
    ("trainer_num_nodes_text", "lightning.trainer.num_nodes=two", r"lightning\.trainer\.num_nodes: must be an integer"),
    ("trainer_not_mapping", "lightning.trainer=5", r"lightning\.trainer: must be a mapping"),
    ("lightning_not_mapping", "lightning=fast", r"lightning: must be a mapping"),
    ("ddp_timeout_text", "lightning.ddp_timeout_s=soon", r"lightning\.ddp_timeout_s: must be a number"),
    # vae_config: diffusers AutoencoderKL / AsymmetricAutoencoderKL keys
    ("vae_config_key_typo", f"{AE}.vae_config.block_out_channel=[32,32,64,64]",
     r"vae_config\.block_out_channel: unknown parameter of diffusers\.AutoencoderKL"),
    ("vae_config_layers_text", f'{AE}.vae_config.layers_per_block="1"',
     r"vae_config\.layers_per_block: must be an integer; got '1'"),
    ("vae_config_scaling_text", f"{AE}.vae_config.scaling_factor=big", r"vae_config\.scaling_factor: must be a number"),
    ("vae_config_not_mapping", f"{AE}.vae_config=sd15", r"vae_config: must be a mapping of AutoencoderKL arguments"),
    # autoencoder: AsymmetricAutoencoder kwargs
    ("autoencoder_key_typo", f"{AE}.vae_confg.latent_channels=4",
     r"autoencoder\.vae_confg: unknown parameter of ldm_asym\.models\.autoencoder\.AsymmetricAutoencoder"),
    ("autoencoder_freeze_encoder", f"{AE}.freeze_encoder=false",
     r"autoencoder\.freeze_encoder: set by ldm_asym\.models\.autoencoder\.AsymmetricAutoencoder itself"),
    ("autoencoder_not_mapping", f"{AE}=sd15", r"autoencoder: must be a mapping of AsymmetricAutoencoder arguments"),
    # a dataset's masks: MaskGenerator kwargs
    ("train_masks_key_typo", f"{TRAIN_MASKS}.presets=thick",
     r"train\.params\.masks\.presets: unknown parameter of ldm_asym\.data\.masks\.MaskGenerator \(valid: p_full, preset\)"),
    ("val_masks_key_typo", f"{VAL_MASKS}.p_ful=0.2", r"validation\.params\.masks\.p_ful: unknown parameter"),
    ("masks_size_set_by_dataset", f"{TRAIN_MASKS}.size=64", r"masks\.size: set by ldm_asym\.data\.masks\.MaskGenerator"),
    ("masks_p_full_text", f"{TRAIN_MASKS}.p_full=half", r"masks\.p_full: must be a number; got 'half'"),
    ("masks_not_mapping", f"{TRAIN_MASKS}=thick", r"train\.params\.masks: must be a mapping of MaskGenerator arguments"),
    # target / params nodes
    ("params_not_mapping", "data.params.train.params=5", r"data\.params\.train\.params: must be a mapping"),
    ("target_not_string", "model.params.loss.target=5", r"model\.params\.loss\.target: must be a dotted class path"),
    ("model_null", "model=null", r"config has no 'model' section"),
    ("model_string", "model=ldm_asym.train.AsymmetricVQGAN", r"model: must be a mapping with target and params"),
]


@pytest.mark.parametrize("override,match", [c[1:] for c in OVERRIDE_CASES], ids=[c[0] for c in OVERRIDE_CASES])
def test_bad_override_is_reported_before_data_or_weights(tmp_path, no_data_no_weights, override, match):
    with pytest.raises(ValueError, match=match):
        run_cli(tmp_path, [TINY], override)
    assert not (tmp_path / "logs").exists()  # nothing written


# ---------------------------------------------------------------------- whole YAML files
FILE_CASES = [
    ("empty", corpus.yaml_empty, r"config .*empty\.yaml is empty"),
    ("comments_only", corpus.yaml_comments_only, r"config .*comments\.yaml is empty"),
    ("top_level_list", corpus.yaml_top_level_list, r"config .*list\.yaml: the top level must be a mapping.*got a list"),
    ("bad_syntax", corpus.yaml_bad_syntax, r"config .*syntax\.yaml is not valid YAML \(ParserError"),
    ("tab_indent", corpus.yaml_tab_indent, r"config .*tabs\.yaml is not valid YAML \(ScannerError"),
    ("binary", corpus.yaml_binary, r"config .*binary\.yaml is not valid YAML \(UnicodeDecodeError"),
    ("inherit_missing", corpus.yaml_inherit_missing, r"config not found: .*no_such_parent\.yaml \(inherited by .*child\.yaml\)"),
    ("inherit_loop", corpus.yaml_inherit_loop, r"`inherit:` loop \(.*loop_b\.yaml -> .*loop_a\.yaml -> .*loop_b\.yaml\)"),
    ("inherit_not_a_name", corpus.yaml_inherit_not_a_name, r"inherit_int\.yaml: `inherit:` must be a file name"),
    ("decoder_dict_typo", corpus.yaml_decoder_plain_dict_typo,
     r"autoencoder\.decoder\.resnets_per_levl: unknown parameter of ldm_asym\.models\.decoder\.AsymmetricDecoder"),
    ("masks_typo_in_file", corpus.yaml_masks_typo_in_file, r"validation\.params\.masks\.pfull: unknown parameter"),
]


@pytest.mark.parametrize("write,match", [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES])
def test_bad_config_file_is_reported_naming_it(tmp_path, no_data_no_weights, write, match):
    cfg = write(tmp_path)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        run_cli(tmp_path, [cfg])


def test_config_file_errors_also_fire_as_later_base(tmp_path, no_data_no_weights):
    """An overlay config that is empty is named even when the first --base is fine."""
    with pytest.raises(ValueError, match=r"overlay\.yaml is empty"):
        run_cli(tmp_path, [TINY, corpus.write_text(tmp_path, "overlay.yaml", "# nothing\n")])


def test_valid_variants_still_pass(tmp_path):
    """The checks accept what is legal: a pasted diffusers config.json as vae_config (private `_` keys,
    AsymmetricAutoencoderKL names), masks without overrides, interpolated callback values."""
    from omegaconf import OmegaConf

    from ldm_asym.cli import load_config, validate

    for name in ("tiny", "tiny_shards", "demo", "demo_stage1", "asym_base", "asym_large_1.5x", "asym_large_2x",
                 "asym_sdxl", "asym_flux"):
        validate(load_config(corpus.ROOT / "configs" / f"{name}.yaml"))
    cfg = OmegaConf.merge(load_config(TINY), OmegaConf.from_dotlist([
        f"{AE}.vae_config._class_name=AutoencoderKL", f"{AE}.vae_config._diffusers_version=0.42.0",
        f"{AE}.vae_config.down_block_out_channels=[32,32,64,64]", f"{AE}.vae_config.sample_size=64",
        f"{AE}.vae_config.shift_factor=null", f"{TRAIN_MASKS}=null",
        "lightning.callbacks.images.every_n_steps=${lightning.callbacks.checkpoint.every_n_steps}",
        "lightning.trainer.precision=32", "lightning.trainer.limit_val_batches=0.5",
    ]))
    validate(cfg)


def test_config_ok_without_train_still_works(tmp_path, capsys):
    assert main(["--base", TINY, "-l", str(tmp_path / "logs")]) == 0
    assert "config OK" in capsys.readouterr().out


# ---------------------------------------------------------------------- mistyped paths (config and API)
@pytest.mark.parametrize("source,match", [
    ("data/demo_vea", r"not found: data/demo_vea .*did you mean data/demo_vae\?"),
    ("./data/demo_vea", r"not found: \./data/demo_vea .*did you mean data/demo_vae\?"),
    ("data/demo_vae/missing/deeper", r"not found: data/demo_vae/missing/deeper"),
], ids=["org_name_shaped", "dot_relative", "deep_path"])
def test_mistyped_vae_source_in_config_is_not_a_hub_download(tmp_path, monkeypatch, no_data_no_weights, source, match):
    monkeypatch.chdir(corpus.ROOT)
    with pytest.raises(FileNotFoundError, match=match) as e:
        run_cli(tmp_path, [TINY], f"model.params.vae_source={source}")
    assert "Hub" not in str(e.value).split("Point model.params")[0]


def test_vae_source_not_a_string(tmp_path, no_data_no_weights):
    with pytest.raises(ValueError, match=r"vae_source: must be a string; got 5"):
        run_cli(tmp_path, [TINY], "model.params.vae_source=5")


@pytest.mark.parametrize("source,match", [
    ("data/demo_vea", r"not found: data/demo_vea .*did you mean data/demo_vae\?"),
    ("data/demo_vae.ckpt", r"not found: data/demo_vae\.ckpt.*did you mean data/demo_vae\?"),
    ("./demo_vae", r"not found: \./demo_vae"),
    ("/nonexistent/models/vae", r"not found: /nonexistent/models/vae"),
], ids=["org_name_shaped", "file_suffix", "dot_relative", "absolute"])
def test_mistyped_path_for_load_autoencoder(monkeypatch, source, match):
    monkeypatch.chdir(corpus.ROOT)
    with pytest.raises(FileNotFoundError, match=match) as e:
        load_autoencoder(source)
    assert "Hugging Face" not in str(e.value)


def test_close_sibling_suggested_for_missing_checkpoint_file(tmp_path):
    (tmp_path / "step-000100.ckpt").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match=r"did you mean .*step-000100\.ckpt\?"):
        load_autoencoder(tmp_path / "step-00100.ckpt")


def test_hub_id_offline_mentions_both_possibilities(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as e:
        load_autoencoder("no-such-org-here/asymmetric-autoencoder-kl-x-1-5")
    msg = str(e.value)
    assert "not a local file or folder" in msg and "Hugging Face Hub" in msg and "hf download" in msg


# ---------------------------------------------------------------------- checkpoint files
@pytest.fixture(scope="module")
def tiny_sd():
    return {k: v.clone() for k, v in make_vae(TINY_VAE).state_dict().items()}


NOT_TORCH = r"is not a readable torch checkpoint"
CKPT_CASES = [
    ("text", lambda d, sd: corpus.ckpt_text(d), NOT_TORCH + r" \(unrecognised content"),
    ("json_text", lambda d, sd: corpus.ckpt_json(d), NOT_TORCH + r" \(unrecognised content"),
    ("garbage", lambda d, sd: corpus.ckpt_garbage(d), NOT_TORCH + r" \(unrecognised content"),
    ("plain_pickle", lambda d, sd: corpus.ckpt_plain_pickle(d), NOT_TORCH + r" \(a plain Python pickle"),
    ("foreign_zip", lambda d, sd: corpus.ckpt_foreign_zip(d), NOT_TORCH + r" \(a zip archive torch cannot read"),
    ("truncated_zip", corpus.ckpt_truncated_zip, NOT_TORCH + r" \(a zip archive torch cannot read: truncated"),
    ("truncated_legacy", corpus.ckpt_truncated_legacy, NOT_TORCH + r" \(a damaged legacy torch file"),
    ("transformer", lambda d, sd: corpus.ckpt_transformer(d),
     r"transformer\.ckpt: not an autoencoder checkpoint: no VAE weights found .*'encoder\.layers\.0\."),
    ("tensor_list", lambda d, sd: corpus.ckpt_tensor_list(d), r"list\.ckpt: checkpoint holds no tensors"),
    ("bare_tensor", lambda d, sd: corpus.ckpt_bare_tensor(d), r"tensor\.ckpt: checkpoint holds no tensors"),
    ("safetensors_text", lambda d, sd: corpus.safetensors_text(d), r"cannot read .*model\.safetensors as safetensors"),
    ("no_encoder_conv_in", lambda d, sd: corpus.ckpt_without_key(d, sd, "encoder.conv_in.weight"),
     r"without_encoder_conv_in_weight\.ckpt: cannot infer the architecture .*'encoder\.conv_in\.weight' is missing"),
    ("no_decoder_conv_out", lambda d, sd: corpus.ckpt_without_key(d, sd, "decoder.conv_out.weight"),
     r"without_decoder_conv_out_weight\.ckpt: cannot infer the decoder's architecture .*decoder\.conv_out\.weight"),
]


@pytest.mark.parametrize("trust", [False, True], ids=["default", "trust_pickle"])
@pytest.mark.parametrize("write,match", [c[1:] for c in CKPT_CASES], ids=[c[0] for c in CKPT_CASES])
def test_bad_checkpoint_file_is_named_and_never_told_to_trust(tmp_path, tiny_sd, write, match, trust):
    path = write(tmp_path, tiny_sd)
    with pytest.raises(ValueError, match=match) as e:
        load_autoencoder(path, trust_pickle=trust)
    msg = str(e.value)
    assert str(path) in msg
    assert "trust_pickle" not in msg and "code execution" not in msg


@pytest.mark.parametrize("trust", [False, True], ids=["default", "trust_pickle"])
def test_malicious_plain_pickle_is_never_unpickled(tmp_path, trust):
    path = corpus.ckpt_malicious_plain_pickle(tmp_path)
    with pytest.raises(ValueError, match=NOT_TORCH + r" \(a plain Python pickle"):
        load_autoencoder(path, trust_pickle=trust)
    assert not (tmp_path / "EXECUTED").exists()


def test_code_execution_diagnosis_only_for_real_torch_pickles(tmp_path, tiny_sd):
    path = corpus.ckpt_needs_code(tmp_path, tiny_sd)
    with pytest.raises(ValueError, match=r"needs_code\.ckpt needs arbitrary code execution.*NotATensor.*trust_pickle=True"):
        load_autoencoder(path)
    assert load_autoencoder(path, trust_pickle=True, norm_num_groups=8).blend == "none"


def test_trusted_pickle_with_unimportable_class(tmp_path, tiny_sd):
    path = corpus.ckpt_unimportable_class(tmp_path, tiny_sd)
    with pytest.raises(ValueError, match=r"needs arbitrary code execution.*ldm_asym_hostile_gone\.Gone"):
        load_autoencoder(path)
    with pytest.raises(ValueError, match=r"gone\.ckpt stores Python objects whose classes cannot be imported") as e:
        load_autoencoder(path, trust_pickle=True)
    assert "trust_pickle" not in str(e.value)


def test_safetensors_content_named_ckpt_loads(tmp_path, tiny_sd):
    path = corpus.ckpt_safetensors_named_ckpt(tmp_path, tiny_sd)
    model = load_autoencoder(path, norm_num_groups=8)
    assert torch.equal(model.state_dict()["decoder.conv_out.weight"], tiny_sd["decoder.conv_out.weight"])


# ---------------------------------------------------------------------- diffusers model folders
def _drop(key):
    return lambda cfg: cfg.pop(key)


def _set(key, value):
    return lambda cfg: cfg.__setitem__(key, value)


FOLDER_CASES = [
    # (id, model, config text or None, edit or None, match)
    ("invalid_json", "asym", "{\"_class_name\": \"AsymmetricAutoencoderKL\",", None, r"config\.json is not valid JSON"),
    ("empty_file", "asym", "", None, r"config\.json is not valid JSON"),
    ("json_array", "asym", "[1, 2, 3]", None, r"config\.json must hold a JSON object .*got a list"),
    ("json_string", "asym", "\"AsymmetricAutoencoderKL\"", None, r"config\.json must hold a JSON object .*got a str"),
    ("binary", "asym", corpus.GARBAGE, None, r"config\.json is not a text file"),
    ("no_class_name", "asym", None, _drop("_class_name"), r"config\.json: expected an AutoencoderKL or Asymmetric"),
    ("no_up_block_out_channels", "asym", None, _drop("up_block_out_channels"),
     r"config\.json \(AsymmetricAutoencoderKL\): missing key 'up_block_out_channels'"),
    ("no_layers_per_up_block", "asym", None, _drop("layers_per_up_block"), r"missing key 'layers_per_up_block'"),
    ("layers_per_up_block_text", "asym", None, _set("layers_per_up_block", "1"),
     r"config\.json .*'layers_per_up_block' must be a non-negative integer; got '1'"),
    ("up_channels_text", "asym", None, _set("up_block_out_channels", "32,64"),
     r"'up_block_out_channels' must be a non-empty list of positive integers"),
    ("up_channels_empty", "asym", None, _set("up_block_out_channels", []),
     r"'up_block_out_channels' must be a non-empty list"),
    ("latent_channels_null", "asym", None, _set("latent_channels", None), r"'latent_channels' must be a non-negative"),
    ("vae_layers_per_block_text", "vae", None, _set("layers_per_block", "2"),
     r"config\.json \(AutoencoderKL\): 'layers_per_block' must be a non-negative integer; got '2'"),
    ("vae_no_block_out_channels", "vae", None, _drop("block_out_channels"), r"missing key 'block_out_channels'"),
    ("vae_scaling_text", "vae", None, _set("scaling_factor", "0.18215"), r"'scaling_factor' must be a number"),
]


@pytest.fixture(scope="module")
def tiny_models():
    return {"asym": make_asym("tiny"), "vae": make_vae(TINY_VAE)}


@pytest.mark.parametrize("model,config,edit,match", [c[1:] for c in FOLDER_CASES], ids=[c[0] for c in FOLDER_CASES])
def test_bad_diffusers_config_json_is_named(tmp_path, tiny_models, model, config, edit, match):
    folder = corpus.diffusers_folder(tmp_path, tiny_models[model], config=config, edit=edit)
    with pytest.raises(ValueError, match=match) as e:
        load_autoencoder(folder)
    assert str(folder / "config.json") in str(e.value)


def test_bad_config_json_in_pipeline_root_names_vae_subfolder(tmp_path, tiny_models):
    corpus.diffusers_folder(tmp_path / "pipe", tiny_models["asym"], config="[]")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "pipe" / "vae" / "config.json"))):
        load_autoencoder(tmp_path / "pipe")


def test_good_folder_still_loads(tmp_path, tiny_models):
    assert ASYM_CONFIGS["tiny"]["up_block_out_channels"] == [32, 64, 64, 64]
    model = load_autoencoder(corpus.diffusers_folder(tmp_path, tiny_models["asym"]))
    assert model.decoder.up_widths == [64, 64, 64, 32] and Path(tmp_path / "vae" / "config.json").is_file()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")
def test_legacy_protocol_4_checkpoint_needs_trust_and_then_loads(tmp_path, tiny_sd):
    """A valid pre-1.6 torch file in pickle protocol 4: the safe loader cannot read it; trusted, it loads."""
    path = tmp_path / "legacy4.ckpt"
    torch.save(tiny_sd, path, _use_new_zipfile_serialization=False, pickle_protocol=4)
    with pytest.raises(ValueError, match=r"legacy4\.ckpt is a legacy .* protocol 4.*trust_pickle=True"):
        load_autoencoder(path)
    assert load_autoencoder(path, trust_pickle=True, norm_num_groups=8).blend == "none"


@pytest.mark.parametrize("override,match", [
    ("lightning.callbacks=[checkpoint]", r"cannot apply the overrides \['lightning.callbacks=\[checkpoint\]'\]"),
    ("data=null", "config has no 'data' section|data"),
])
def test_overrides_that_break_the_config_shape_are_named(tmp_path, override, match):
    from ldm_asym.cli import main

    with pytest.raises(ValueError, match=match):
        main(["--base", "configs/tiny.yaml", "-l", str(tmp_path), override])


@pytest.mark.parametrize("args,match", [
    (["lightning.trainer.max_steps=ten"], "lightning.trainer.max_steps: must be"),
    (["data.params.batch_size=5000"], "fewer than one batch of 5000"),
    (["-r", "/nonexistent/run"], "cannot resume: /nonexistent/run does not exist"),
])
def test_main_py_reports_setup_problems_in_one_line(tmp_path, args, match):
    """main.py itself: a problem found before training is a message and exit code 2, no traceback."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    base = [] if args[0] == "-r" else ["--base", "configs/tiny.yaml"]
    out = subprocess.run([sys.executable, "main.py", *base, "-t", "-l", str(tmp_path), *args], cwd=repo,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and re.search(match, out.stderr), out.stderr[-2000:]


def test_swapping_a_target_drops_the_old_params():
    """A later config (or a dotlist) that changes a dataset's `target` must not hand the new class the
    old one's arguments (ImageNetDataset's `split` to ShardDataset): its params start afresh."""
    from omegaconf import OmegaConf

    from ldm_asym.config import load_config, merge

    base = load_config(corpus.ROOT / "configs" / "asym_base.yaml")
    swapped = merge(base, OmegaConf.from_dotlist(["data.params.train.target=ldm_asym.data.ShardDataset",
                                                  "data.params.train.params.input_dir=x"]))
    assert OmegaConf.to_container(swapped.data.params.train.params) == {"input_dir": "x"}
    kept = merge(base, OmegaConf.from_dotlist(["data.params.train.params.size=128"]))
    assert kept.data.params.train.params.split == "train" and kept.data.params.train.params.size == 128
    sdxl = load_config(corpus.ROOT / "configs" / "asym_sdxl.yaml")  # through `inherit:` too
    assert "split" not in sdxl.data.params.train.params and "root" not in sdxl.data.params.validation.params
