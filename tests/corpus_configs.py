"""A corpus of hostile inputs for config loading and checkpoint / model-folder reading.

Each writer takes a folder and returns the path it wrote (or what to pass to the entry point);
`tests/test_hostile_configs.py` feeds them to `ldm_asym.cli.main` and `ldm_asym.load_autoencoder`.
Everything is tiny and deterministic (no random bytes from the OS, no downloads).
"""

from __future__ import annotations

import json
import pickle
import sys
import types
import zipfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"
# Fixed "random" bytes: not UTF-8, no known magic number.
GARBAGE = bytes((i * 193 + 71) % 256 for i in range(512))


# ---------------------------------------------------------------------- YAML configs
def write_text(folder: Path, name: str, text: str | bytes) -> Path:
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


def tiny_variant(folder: Path, old: str, new: str, name: str = "variant.yaml") -> Path:
    """configs/tiny.yaml with one exact piece of text replaced (the piece must be there)."""
    text = TINY.read_text()
    assert old in text, old
    return write_text(folder, name, text.replace(old, new))


def yaml_empty(folder):
    return write_text(folder, "empty.yaml", "")


def yaml_comments_only(folder):
    return write_text(folder, "comments.yaml", "# a config that was commented out\n\n   # entirely\n")


def yaml_top_level_list(folder):
    return write_text(folder, "list.yaml", "- model: {}\n- data: {}\n")


def yaml_bad_syntax(folder):
    return write_text(folder, "syntax.yaml", "model:\n  target: [ldm_asym.train.AsymmetricVQGAN\n  params: {}\n")


def yaml_tab_indent(folder):
    return write_text(folder, "tabs.yaml", "model:\n\ttarget: ldm_asym.train.AsymmetricVQGAN\n")


def yaml_binary(folder):
    return write_text(folder, "binary.yaml", GARBAGE)


def yaml_inherit_missing(folder):
    return write_text(folder, "child.yaml", "inherit: no_such_parent.yaml\nlightning: {trainer: {max_steps: 3}}\n")


def yaml_inherit_loop(folder):
    write_text(folder, "loop_a.yaml", "inherit: loop_b.yaml\nlightning: {trainer: {max_steps: 3}}\n")
    return write_text(folder, "loop_b.yaml", "inherit: loop_a.yaml\nlightning: {trainer: {max_steps: 4}}\n")


def yaml_inherit_not_a_name(folder):
    return write_text(folder, "inherit_int.yaml", "inherit: [a.yaml, b.yaml]\nlightning: {trainer: {max_steps: 3}}\n")


def yaml_decoder_plain_dict_typo(folder):
    """`decoder:` as plain AsymmetricDecoder kwargs (no target) with a misspelled key."""
    return tiny_variant(folder,
                        "      decoder:\n        target: ldm_asym.models.AsymmetricDecoder\n"
                        "        params: {up_widths: [64, 64, 64, 32], resnets_per_level: 2, blend: add}\n",
                        "      decoder: {up_widths: [64, 64, 64, 32], resnets_per_levl: 2, blend: add}\n",
                        "decoder_dict.yaml")


def yaml_masks_typo_in_file(folder):
    return tiny_variant(folder, "masks: {preset: thick, p_full: 0.0}", "masks: {preset: thick, pfull: 0.0}",
                        "masks_typo.yaml")


# ---------------------------------------------------------------------- checkpoint files
def ckpt_text(folder):
    return write_text(folder, "notes.ckpt", "hello world\nthis is a text file, not weights\n")


def ckpt_json(folder):
    return write_text(folder, "config.ckpt", json.dumps({"state_dict": {"a": 1}}))


def ckpt_garbage(folder):
    return write_text(folder, "garbage.ckpt", GARBAGE)


def ckpt_plain_pickle(folder):
    path = Path(folder) / "plain.ckpt"
    path.write_bytes(pickle.dumps({"state_dict": {"encoder.conv_in.weight": [1.0, 2.0]}}, protocol=4))
    return path


class _Marker:
    """Unpickling this runs code: it creates a marker file (proves nothing was executed)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def ckpt_malicious_plain_pickle(folder):
    """A plain pickle (not torch.save) whose loading would run code: never unpickled, even when trusted."""
    path = Path(folder) / "evil.ckpt"
    path.write_bytes(pickle.dumps({"x": _Marker(Path(folder) / "EXECUTED")}, protocol=2))
    return path


def ckpt_foreign_zip(folder):
    path = Path(folder) / "archive.ckpt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "a zip file, not a torch checkpoint")
    return path


def ckpt_truncated_zip(folder, sd):
    full = Path(folder) / "full.ckpt"
    torch.save(sd, full)
    path = Path(folder) / "truncated.ckpt"
    path.write_bytes(full.read_bytes()[: full.stat().st_size // 3])
    return path


def ckpt_truncated_legacy(folder, sd):
    full = Path(folder) / "legacy_full.ckpt"
    torch.save(sd, full, _use_new_zipfile_serialization=False)
    path = Path(folder) / "legacy_truncated.ckpt"
    path.write_bytes(full.read_bytes()[: full.stat().st_size // 3])
    return path


class NotATensor:
    """A Python object inside a torch checkpoint: weights_only refuses it."""


def ckpt_needs_code(folder, sd):
    path = Path(folder) / "needs_code.ckpt"
    torch.save({"state_dict": sd, "extra": NotATensor()}, path)
    return path


def ckpt_unimportable_class(folder, sd):
    """A torch checkpoint referencing a class from a module that no longer exists."""
    mod = types.ModuleType("ldm_asym_hostile_gone")
    cls = type("Gone", (), {"__module__": mod.__name__})
    mod.Gone = cls
    sys.modules[mod.__name__] = mod
    try:
        path = Path(folder) / "gone.ckpt"
        torch.save({"state_dict": sd, "extra": cls()}, path)
    finally:
        del sys.modules[mod.__name__]
    return path


def ckpt_transformer(folder):
    torch.manual_seed(0)
    net = torch.nn.Transformer(d_model=8, nhead=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=8,
                               batch_first=True)
    path = Path(folder) / "transformer.ckpt"
    torch.save(net.state_dict(), path)
    return path


def ckpt_tensor_list(folder):
    path = Path(folder) / "list.ckpt"
    torch.save([torch.zeros(2), torch.ones(2)], path)
    return path


def ckpt_bare_tensor(folder):
    path = Path(folder) / "tensor.ckpt"
    torch.save(torch.zeros(3, 3), path)
    return path


def ckpt_safetensors_named_ckpt(folder, sd):
    from safetensors.torch import save_file

    path = Path(folder) / "really_safetensors.ckpt"
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    return path


def safetensors_text(folder):
    return write_text(folder, "model.safetensors", "not a safetensors file\n")


def ckpt_without_key(folder, sd, key):
    path = Path(folder) / f"without_{key.replace('.', '_')}.ckpt"
    torch.save({k: v for k, v in sd.items() if k != key}, path)
    return path


# ---------------------------------------------------------------------- diffusers folders
def diffusers_folder(folder, model, name="vae", config: str | bytes | None = None, edit=None):
    """save_pretrained(model), then replace config.json by `config` text, or edit its dict with `edit`."""
    out = Path(folder) / name
    model.save_pretrained(out)
    cfg_file = out / "config.json"
    if config is not None:
        (cfg_file.write_bytes if isinstance(config, bytes) else cfg_file.write_text)(config)
    elif edit is not None:
        cfg = json.loads(cfg_file.read_text())
        edit(cfg)
        cfg_file.write_text(json.dumps(cfg))
    return out
