"""Weights in and out: diffusers folders, SD single files, the authors' checkpoints, our own runs.

Every source ends as a state dict in diffusers' `AsymmetricAutoencoderKL` key layout (which is ours),
plus the architecture, read from a config where the source has one and inferred from tensor shapes
where it does not. Loading is strict: a missing, unexpected or mis-shaped tensor is an error.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from ldm_asym.models.autoencoder import AsymmetricAutoencoder

log = logging.getLogger(__name__)

# Where a full SD / Lightning checkpoint keeps its VAE, in order of preference ("" = a bare VAE).
VAE_PREFIXES = ("first_stage_model.", "vae.", "model.", "autoencoder.", "")
# Tensors that belong to training, not to the autoencoder (authors' dead `up_layers` included).
DROPPED = re.compile(r"^(loss\.|discriminator\.|decoder\.up_layers\.)")
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
# Keys every VAE layout has (diffusers and LDM alike), so a prefix is only taken when it holds a VAE.
VAE_MARKERS = ("encoder.conv_in.", "encoder.conv_out.", "decoder.conv_in.", "decoder.conv_out.")
# Our training checkpoints carry this key: the model config and, optionally, EMA weights.
META_KEY = "ldm_asym"


class WeightsMismatchError(ValueError):
    """A checkpoint does not fit the model: lists missing, unexpected and mis-shaped tensors."""


# ---------------------------------------------------------------------- reading files
_ZIP_MAGIC = b"PK\x03\x04"
# torch's legacy (pre-1.6) format starts with the pickled magic number 0x1950a86a20f9469cfc6c.
_LEGACY_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")  # after the protocol/frame header


def _sniff(path: Path) -> str:
    """What a file looks like from its first bytes: zip (torch's format), legacy (torch < 1.6),
    pickle (a plain Python pickle, not written by torch.save), safetensors, or unknown."""
    with open(path, "rb") as f:
        head = f.read(32)
    if head.startswith(_ZIP_MAGIC):
        return "zip"
    if head[:1] == b"\x80" and _LEGACY_MAGIC in head:
        return "legacy"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{":
        n = int.from_bytes(head[:8], "little")
        if 0 < n <= path.stat().st_size - 8:
            return "safetensors"
    return "unknown"


def _protocol(path: Path) -> int:
    with open(path, "rb") as f:
        return f.read(2)[1]


def _read_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated headers
        raise ValueError(f"cannot read {path} as safetensors (truncated or not a safetensors file): {e}") from e


def _not_torch(path: Path, kind: str, e: BaseException | None = None) -> ValueError:
    what = {"pickle": "a plain Python pickle, not a file written by torch.save",
            "unknown": "unrecognised content: truncated, or another file type",
            "zip": "a zip archive torch cannot read: truncated, corrupt or not written by torch.save",
            "legacy": "a damaged legacy torch file: truncated or corrupt"}[kind]
    detail = f" ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})" if e is not None else ""
    return ValueError(f"{path} is not a readable torch checkpoint ({what}){detail}")


def read_checkpoint(path: str | os.PathLike, trust_pickle: bool = False) -> dict:
    """Load a `.safetensors` file or a torch pickle (`weights_only=True` unless `trust_pickle`).

    Errors name the file and say what it is: only a valid torch file whose pickle references Python
    objects beyond tensors is said to need `trust_pickle=True`; random bytes, text, plain pickles and
    truncated archives are "not a torch checkpoint"."""
    import pickle

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}{_did_you_mean(path)}")
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint {path} is empty (0 bytes): an interrupted download or save?")
    kind = _sniff(path)
    if path.suffix == ".safetensors" or kind == "safetensors":
        return _read_safetensors(path)
    if kind in ("pickle", "unknown"):  # torch.load would fail, or (weights_only=False) run arbitrary code
        raise _not_torch(path, kind)
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        if not trust_pickle and "Unsupported global" in str(e):
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
            raise ValueError(
                f"{path} needs arbitrary code execution to unpickle: it stores Python objects, not just tensors"
                f"{f' (first: {found.group(1)})' if found else ''}. Load it with trust_pickle=True "
                f"(CLI: --trust-pickle) only if you trust where it came from."
            ) from e
        if not trust_pickle and kind == "legacy" and "Unsupported operand" in str(e) and _protocol(path) > 2:
            raise ValueError(
                f"{path} is a legacy (torch < 1.6) checkpoint written with pickle protocol {_protocol(path)}, which "
                f"torch's safe loader cannot read. Load it with trust_pickle=True (CLI: --trust-pickle) only if you "
                f"trust where it came from (unpickling it can run code)."
            ) from e
        raise _not_torch(path, kind, e) from e
    except (ImportError, AttributeError) as e:  # trusted pickle naming a class that is not importable here
        raise ValueError(f"{path} stores Python objects whose classes cannot be imported here "
                         f"({type(e).__name__}: {e})") from e
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - RuntimeError, EOFError, KeyError, ...: a damaged file
        raise _not_torch(path, kind, e) from e


def split_checkpoint(obj: Mapping[str, Any], use_ema: bool = False) -> tuple[dict, dict]:
    """-> (autoencoder state dict in whatever layout the file uses, our metadata or {})."""
    meta = dict(obj.get(META_KEY) or {}) if isinstance(obj, Mapping) else {}
    sd = obj.get("state_dict", obj) if isinstance(obj, Mapping) else None
    if not isinstance(sd, Mapping) or not any(torch.is_tensor(v) for v in sd.values()):
        raise ValueError("checkpoint holds no tensors (not a model checkpoint)")
    ema = {k[len("ema_decoder."):]: v for k, v in sd.items() if k.startswith("ema_decoder.")}
    if use_ema and not ema:
        raise ValueError("use_ema=True, but this checkpoint holds no EMA weights (train with ema_decay)")
    prefix = next((p for p in VAE_PREFIXES if any(k.startswith(tuple(p + m for m in VAE_MARKERS)) for k in sd)), None)
    if prefix is None:
        raise ValueError(
            "not an autoencoder checkpoint: no VAE weights found (no encoder or decoder keys such as "
            f"encoder.conv_in.weight or decoder.conv_out.weight, bare or under one of "
            f"{', '.join(repr(p) for p in VAE_PREFIXES if p)}); its first keys are {list(sd)[:5]}"
        )
    out = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix) and torch.is_tensor(v)}
    out = {k: v for k, v in out.items() if not DROPPED.match(k)}
    if use_ema:
        out.update({"decoder." + k: v for k, v in ema.items()})
    return out, meta


# ---------------------------------------------------------------------- LDM / authors' layout
def is_ldm_layout(sd: Mapping[str, Any]) -> bool:
    return any(k.startswith(("encoder.down.", "decoder.up.", "decoder.mid.block_", "encoder.mid.block_")) for k in sd)


def ldm_to_diffusers(sd: Mapping[str, torch.Tensor]) -> dict:
    """Original LDM / authors' keys -> diffusers keys (DESIGN §6), through diffusers' own converter."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    branch = {k: v for k, v in sd.items() if k.startswith("decoder.encoder.")}
    rest = {k: v for k, v in sd.items() if k not in branch}
    levels = lambda pat: len({m.group(1) for k in rest if (m := re.match(pat, k))})  # noqa: E731
    config = {
        "down_block_types": ["DownEncoderBlock2D"] * levels(r"encoder\.down\.(\d+)\."),
        "up_block_types": ["UpDecoderBlock2D"] * levels(r"decoder\.up\.(\d+)\."),
    }
    out = convert_ldm_vae_checkpoint(rest, config)
    # The converter copies only the keys it knows; count so nothing is lost on the way.
    # (It copies tensors or slices them, so storage pointers tell which inputs it used.)
    used = {v.untyped_storage().data_ptr() for v in out.values()}
    lost = sorted(k for k, v in rest.items() if v.untyped_storage().data_ptr() not in used)
    if lost:
        raise WeightsMismatchError(f"LDM->diffusers conversion does not know {len(lost)} tensors: {lost[:10]}")
    out.update({"decoder.condition_encoder." + k[len("decoder.encoder."):]: v for k, v in branch.items()})
    return out


# ---------------------------------------------------------------------- architecture
def _count(sd: Mapping, pattern: str) -> int:
    return len({m.group(1) for k in sd if (m := re.match(pattern, k))})


def _inferred(what: str, infer, sd: Mapping[str, torch.Tensor]) -> dict:
    """`infer(sd)`, with a missing or misshaped tensor reported as such instead of a KeyError."""
    try:
        return infer(sd)
    except (KeyError, IndexError) as e:
        raise ValueError(f"cannot infer the {what} from the tensors: {e} is missing or has an unexpected "
                         f"shape (an incomplete or foreign checkpoint?)") from e


def infer_config(sd: Mapping[str, torch.Tensor]) -> dict:
    return _inferred("architecture", _infer_config, sd)


def _infer_config(sd: Mapping[str, torch.Tensor]) -> dict:
    """Model config (as `AsymmetricAutoencoder.config()`) from diffusers-layout tensor shapes alone.

    Not inferable from shapes: `norm_num_groups` (32 assumed), `scaling_factor` / `shift_factor`
    (SD 1.x/2.x values assumed for 4 channels: pass `scaling_factor=0.13025` for SDXL).
    """
    if "encoder.conv_out.weight" not in sd:
        raise ValueError(
            "checkpoint has no encoder weights; pass vae=<SD VAE source> to take the frozen encoder from there"
        )
    latent = sd["encoder.conv_out.weight"].shape[0] // 2
    n_down = _count(sd, r"encoder\.down_blocks\.(\d+)\.")
    vae = {
        "in_channels": sd["encoder.conv_in.weight"].shape[1],
        "down_block_types": ["DownEncoderBlock2D"] * n_down,
        "block_out_channels": [sd[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(n_down)],
        "layers_per_block": _count(sd, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."),
        "latent_channels": latent,
        "use_quant_conv": "quant_conv.weight" in sd,
        "use_post_quant_conv": "post_quant_conv.weight" in sd,
        "mid_block_add_attention": "encoder.mid_block.attentions.0.to_q.weight" in sd,
    }
    if latent == 16:
        log.warning("16-channel VAE without a config: assuming SD3 latent scaling (1.5305, shift 0.0609); "
                    "pass scaling_factor= and shift_factor= for FLUX (0.3611, 0.1159)")
        vae.update(scaling_factor=1.5305, shift_factor=0.0609)
    return {"vae_config": vae, "decoder": infer_decoder_config(sd)}


def infer_decoder_config(sd: Mapping[str, torch.Tensor]) -> dict:
    return _inferred("decoder's architecture", _infer_decoder_config, sd)


def _infer_decoder_config(sd: Mapping[str, torch.Tensor]) -> dict:
    n_up = _count(sd, r"decoder\.up_blocks\.(\d+)\.")
    if not n_up:
        raise ValueError("checkpoint has no decoder weights (decoder.up_blocks.*)")
    blend = "none"
    if any(k.startswith("decoder.condition_encoder.") for k in sd):
        blend = "concat" if any(k.startswith("decoder.blend_convs.") for k in sd) else "add"
    return {
        "latent_channels": sd["decoder.conv_in.weight"].shape[1],
        "out_channels": sd["decoder.conv_out.weight"].shape[0],
        "up_widths": [sd[f"decoder.up_blocks.{i}.resnets.0.conv2.weight"].shape[0] for i in range(n_up)],
        "resnets_per_level": _count(sd, r"decoder\.up_blocks\.0\.resnets\.(\d+)\."),
        "blend": blend,
    }


# config.json keys we read (required ones per class) and what they must hold.
_CONFIG_REQUIRED = {
    "AsymmetricAutoencoderKL": ("up_block_out_channels", "layers_per_up_block"),
    "AutoencoderKL": ("block_out_channels", "layers_per_block"),
}
_CONFIG_INT_LISTS = ("block_out_channels", "up_block_out_channels", "down_block_out_channels")
_CONFIG_INTS = ("layers_per_block", "layers_per_up_block", "layers_per_down_block", "latent_channels",
                "in_channels", "out_channels", "norm_num_groups")
_CONFIG_NUMBERS = ("scaling_factor",)


def _config_problems(cfg: Mapping[str, Any]) -> list[str]:
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    problems = [f"missing key {k!r}" for k in _CONFIG_REQUIRED[cfg["_class_name"]] if k not in cfg]
    for k in _CONFIG_INT_LISTS:
        if k in cfg and not (isinstance(cfg[k], (list, tuple)) and cfg[k] and all(is_int(c) and c > 0 for c in cfg[k])):
            problems.append(f"{k!r} must be a non-empty list of positive integers; got {cfg[k]!r}")
    for k in _CONFIG_INTS:
        if k in cfg and not (is_int(cfg[k]) and cfg[k] >= 0):
            problems.append(f"{k!r} must be a non-negative integer; got {cfg[k]!r}")
    for k in _CONFIG_NUMBERS:
        if k in cfg and not (isinstance(cfg[k], (int, float)) and not isinstance(cfg[k], bool)):
            problems.append(f"{k!r} must be a number; got {cfg[k]!r}")
    return problems


def read_diffusers_config(path: str | os.PathLike) -> dict:
    """A diffusers `config.json` as a dict, with errors that name the file."""
    path = Path(path)
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not a text file (not a diffusers config.json): {e}") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} must hold a JSON object (a diffusers model config); got a {type(cfg).__name__}")
    return cfg


def config_from_diffusers(cfg: Mapping[str, Any], where: str | os.PathLike = "diffusers config") -> dict:
    """diffusers `AutoencoderKL` / `AsymmetricAutoencoderKL` config.json -> our model config.
    `where` (the file) is named in errors."""
    if not isinstance(cfg, Mapping):
        raise ValueError(f"{where} must be a JSON object (a diffusers model config); got {type(cfg).__name__}")
    name = cfg.get("_class_name")
    if name not in _CONFIG_REQUIRED:
        raise ValueError(f"{where}: expected an AutoencoderKL or AsymmetricAutoencoderKL config, "
                         f"got _class_name={name!r}")
    problems = _config_problems(cfg)
    if problems:
        raise ValueError(f"{where} ({name}): " + "; ".join(problems))
    if name == "AsymmetricAutoencoderKL":
        up, layers, blend = cfg["up_block_out_channels"], cfg["layers_per_up_block"], "add"
    else:
        up, layers, blend = cfg["block_out_channels"], cfg["layers_per_block"], "none"
        if not cfg.get("mid_block_add_attention", True):
            raise ValueError(f"{where}: VAEs without decoder mid-block attention are not supported")
    return {
        "vae_config": dict(cfg),
        "decoder": {
            "latent_channels": cfg.get("latent_channels", 4),
            "out_channels": cfg.get("out_channels", 3),
            "up_widths": list(reversed(up)),  # diffusers lists fine -> coarse; we run coarse -> fine
            "resnets_per_level": layers + 1,
            "blend": blend,
            "norm_num_groups": cfg.get("norm_num_groups", 32),
        },
    }


def apply_overrides(config: dict, overrides: Mapping[str, Any]) -> dict:
    """Keyword overrides go to the decoder or the VAE config, wherever the key belongs."""
    from ldm_asym.models.autoencoder import _VAE_DEFAULTS

    config = {"vae_config": dict(config["vae_config"]), "decoder": dict(config["decoder"])}
    for key, value in overrides.items():
        if key in ("up_widths", "resnets_per_level", "blend", "out_channels"):
            config["decoder"][key] = value
        elif key == "norm_num_groups":
            config["decoder"][key] = config["vae_config"][key] = value
        elif key in _VAE_DEFAULTS:
            config["vae_config"][key] = value
        else:
            raise TypeError(f"unknown override {key!r}")
    return config


# ---------------------------------------------------------------------- loading
def load_state_dict_strict(module: torch.nn.Module, sd: Mapping[str, torch.Tensor], what: str = "model") -> None:
    """`load_state_dict(strict=True)` with one readable error listing every problem."""
    own = module.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(sd) if own[k].shape != sd[k].shape)
    if missing or unexpected or shapes:
        def show(items):
            return "\n    ".join(items[:20]) + (f"\n    ... and {len(items) - 20} more" if len(items) > 20 else "")
        parts = [f"{len(x)} {name}:\n    {show(x)}" for name, x in
                 (("missing", missing), ("unexpected", unexpected), ("shape mismatches", shapes)) if x]
        raise WeightsMismatchError(f"weights do not fit the {what}; " + "\n".join(parts))
    module.load_state_dict(sd, strict=True)


def _resolve(source: str | os.PathLike) -> tuple[dict, dict | None, dict]:
    """source -> (diffusers-layout state dict, config or None, metadata)."""
    path = Path(source)
    if path.is_dir():
        if (path / "checkpoints" / "last.ckpt").is_file():  # a training run folder
            return load_weights(path / "checkpoints" / "last.ckpt")
        if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
            return _resolve(path / "vae")  # a diffusers pipeline root
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{path} is a folder without config.json (nor vae/config.json, checkpoints/last.ckpt)")
        weights = next((path / w for w in WEIGHT_FILES if (path / w).is_file()), None)
        if weights is None:
            raise FileNotFoundError(f"{path} has config.json but no weights ({' or '.join(WEIGHT_FILES)})")
        config = config_from_diffusers(read_diffusers_config(cfg_file), cfg_file)
        return dict(read_checkpoint(weights)), config, {}
    why = missing_source_message(str(source))
    if why:
        raise FileNotFoundError(why)
    return _resolve(_download(str(source)))


def _did_you_mean(path: Path) -> str:
    """' (did you mean X?)' for the closest existing name in the path's parent folder, or ''."""
    import difflib

    parent = path.parent
    try:
        names = [p.name for p in parent.iterdir()] if parent.is_dir() else []
    except OSError:
        names = []
    close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.6)
    return f" (did you mean {parent / close[0] if str(parent) != '.' else close[0]}?)" if close else ""


def looks_like_path(source: str) -> bool:
    """Whether a string that names nothing on disk was meant as a local path rather than a Hub id."""
    path = Path(source)
    if source.startswith((".", "/", "~")) or not HUB_ID.match(source):
        return True
    if path.suffix in (".ckpt", ".safetensors", ".pt", ".pth", ".bin", ".json"):
        return True
    if os.sep in source and len(path.parts) > 2:
        return True
    # `org/name` whose `org` is a local folder, or whose name is close to something in that folder.
    return path.parent.is_dir() or bool(_did_you_mean(path))


def missing_source_message(source: str) -> str | None:
    """None when `source` exists or reads as a Hub id (org/name); else why it is not found."""
    path = Path(source)
    if path.exists():
        return None
    if looks_like_path(source):
        return f"not found: {source} (no such file or folder here, in {Path.cwd()}){_did_you_mean(path)}"
    if HUB_ID.match(source):
        return None
    return f"{source!r} is neither a file, a folder, nor a Hugging Face Hub id (org/name)"


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        patterns = [f"{sub}{f}" for sub in ("", "vae/") for f in ("config.json", WEIGHT_FILES[0])]
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:
        raise FileNotFoundError(
            f"{repo_id!r} is not a local file or folder (in {Path.cwd()}), so it was taken as a Hugging Face Hub "
            f"id, and fetching it failed ({type(e).__name__}: {e}). If you meant a local path, check its spelling. "
            f"If you meant the Hub and are offline: on a machine with internet run `hf download {repo_id} "
            f"--include 'config.json' 'diffusion_pytorch_model.safetensors' 'vae/*' --local-dir DIR`, copy DIR "
            f"here and pass its path."
        ) from e


def load_weights(source: str | os.PathLike, trust_pickle: bool = False, use_ema: bool = False):
    """Any supported source -> (diffusers-layout state dict, config or None, metadata)."""
    path = Path(source)
    if path.is_file():
        try:
            sd, meta = split_checkpoint(read_checkpoint(path, trust_pickle), use_ema=use_ema)
        except ValueError as e:
            if str(path) in str(e):
                raise
            raise ValueError(f"{path}: {e}") from e
        if is_ldm_layout(sd):
            sd = ldm_to_diffusers(sd)
        return sd, meta.get("model_config"), meta
    if use_ema:
        raise ValueError(f"use_ema=True needs a training checkpoint file, got {source}")
    return _resolve(source)


def load_autoencoder(
    source: str | os.PathLike,
    *,
    vae: str | os.PathLike | None = None,
    trust_pickle: bool = False,
    use_ema: bool = False,
    **overrides: Any,
) -> AsymmetricAutoencoder:
    """Build an `AsymmetricAutoencoder` from any supported source, with all its weights.

    source: a diffusers `AsymmetricAutoencoderKL` or `AutoencoderKL` folder, a pipeline root with
        `vae/`, an SD single file (`.ckpt` / `.safetensors`; `first_stage_model.`, `vae.` or no
        prefix; Lightning `state_dict` nesting), the authors' Lightning checkpoints, one of our
        training checkpoints or run folders, or a Hub id (needs internet).
    vae: take the frozen encoder, quant convs and latent scaling from this source instead
        (for decoder-only files).
    overrides: architecture keys that a file cannot tell (e.g. `scaling_factor=0.13025` for SDXL,
        `norm_num_groups`) or that you want to force; they must still fit the weights.
    """
    sd, config, _ = load_weights(source, trust_pickle=trust_pickle, use_ema=use_ema)
    try:
        if vae is not None:
            vae_sd, vae_config, _ = load_weights(vae, trust_pickle=trust_pickle)
            vae_config = vae_config or infer_config(vae_sd)
            sd = {k: v for k, v in sd.items() if k.startswith("decoder.")}
            sd.update({k: v for k, v in vae_sd.items() if not k.startswith("decoder.")})
            config = {"vae_config": vae_config["vae_config"],
                      "decoder": (config or {}).get("decoder") or infer_decoder_config(sd)}
        config = config or infer_config(sd)
    except ValueError as e:
        if str(source) in str(e) or (vae is not None and str(vae) in str(e)):
            raise
        raise type(e)(f"{source}: {e}") from e
    config = apply_overrides(config, overrides)
    model = AsymmetricAutoencoder(**config)
    load_state_dict_strict(model, sd, f"AsymmetricAutoencoder from {source}")
    return model


def from_diffusers(vae) -> AsymmetricAutoencoder:
    """An in-memory diffusers `AutoencoderKL` / `AsymmetricAutoencoderKL` -> ours, same weights."""
    config = config_from_diffusers({"_class_name": type(vae).__name__, **vae.config})
    model = AsymmetricAutoencoder(**config)
    load_state_dict_strict(model, vae.state_dict(), f"AsymmetricAutoencoder from {type(vae).__name__}")
    return model.to(vae.dtype)


def init_from_vae(model: AsymmetricAutoencoder, source: str | os.PathLike, init_decoder: bool = True,
                  trust_pickle: bool = False) -> set[str]:
    """Load an SD VAE into `model`: encoder, quant convs always; with `init_decoder`, the decoder too
    when its SD-shaped part matches the VAE decoder's shapes.

    Returns the names of the decoder parameters that were initialised from the VAE (they train at a
    reduced learning rate). The branch, and every decoder tensor whose shape differs from the SD
    decoder's (large variants), stay at their fresh initialisation. A VAE whose encoder does not fit
    raises `WeightsMismatchError`.
    """
    sd, _, _ = load_weights(source, trust_pickle=trust_pickle)
    frozen = {k: v for k, v in sd.items() if not k.startswith("decoder.")}
    sub = torch.nn.Module()
    for name in ("encoder", "quant_conv", "post_quant_conv"):
        if getattr(model, name) is not None:
            setattr(sub, name, getattr(model, name))
    load_state_dict_strict(sub, frozen, f"frozen encoder from {source}")
    if not init_decoder:
        return set()
    dec = {k[len("decoder."):]: v for k, v in sd.items() if k.startswith("decoder.")}
    dec_own = model.decoder.state_dict()
    match = {k: v for k, v in dec.items() if k in dec_own and dec_own[k].shape == v.shape}
    # All-or-nothing per architecture: a partial copy of the SD decoder is not a meaningful start.
    sd_names = {k for k in dec_own if not k.startswith(("condition_encoder.", "blend_convs."))}
    if set(match) >= sd_names:
        model.decoder.load_state_dict(match, strict=False)
        return {k for k, _ in model.decoder.named_parameters() if k in sd_names}
    return set()


# ---------------------------------------------------------------------- export
def to_diffusers(model: AsymmetricAutoencoder):
    """Our model -> a diffusers `AsymmetricAutoencoderKL` (blend add) or `AutoencoderKL` (blend none)."""
    from diffusers import AsymmetricAutoencoderKL, AutoencoderKL

    vae, dec = model.vae_config, model.config()["decoder"]
    if model.blend == "concat":
        raise ValueError("blend 'concat' has no diffusers equivalent (diffusers implements only the paper's "
                         "additive mask-guided blending); export an 'add' or 'none' decoder instead")
    if dec["norm_num_groups"] != vae["norm_num_groups"]:
        raise ValueError(f"diffusers uses one norm_num_groups for encoder and decoder; ours are "
                         f"{vae['norm_num_groups']} and {dec['norm_num_groups']}")
    sd = model.state_dict()
    if model.blend == "add":
        c = model.latent_channels
        # diffusers' asymmetric VAE always has quant convs: identity 1x1 convs are exact stand-ins.
        for name, ch in (("quant_conv", 2 * c), ("post_quant_conv", c)):
            if getattr(model, name) is None:
                sd[f"{name}.weight"] = torch.eye(ch)[:, :, None, None]
                sd[f"{name}.bias"] = torch.zeros(ch)
        if vae.get("shift_factor") not in (None, 0):
            log.warning("AsymmetricAutoencoderKL's config has no shift_factor; pipelines must apply %s themselves",
                        vae["shift_factor"])
        out = AsymmetricAutoencoderKL(
            in_channels=vae["in_channels"],
            out_channels=dec["out_channels"],
            down_block_types=tuple(vae["down_block_types"]),
            down_block_out_channels=tuple(vae["block_out_channels"]),
            layers_per_down_block=vae["layers_per_block"],
            up_block_types=("UpDecoderBlock2D",) * len(dec["up_widths"]),
            up_block_out_channels=tuple(reversed(dec["up_widths"])),
            layers_per_up_block=dec["resnets_per_level"] - 1,
            act_fn=vae["act_fn"],
            latent_channels=model.latent_channels,
            norm_num_groups=vae["norm_num_groups"],
            scaling_factor=vae["scaling_factor"],
        )
    else:
        if (list(reversed(dec["up_widths"])) != list(vae["block_out_channels"])
                or dec["resnets_per_level"] != vae["layers_per_block"] + 1):
            raise ValueError("diffusers' AutoencoderKL needs the decoder to mirror the encoder (same widths, "
                             "layers_per_block + 1 resnets per level); this vanilla decoder does not")
        out = AutoencoderKL(
            in_channels=vae["in_channels"],
            out_channels=dec["out_channels"],
            down_block_types=tuple(vae["down_block_types"]),
            up_block_types=("UpDecoderBlock2D",) * len(dec["up_widths"]),
            block_out_channels=tuple(vae["block_out_channels"]),
            layers_per_block=vae["layers_per_block"],
            act_fn=vae["act_fn"],
            latent_channels=model.latent_channels,
            norm_num_groups=vae["norm_num_groups"],
            scaling_factor=vae["scaling_factor"],
            shift_factor=vae["shift_factor"],
            use_quant_conv=vae["use_quant_conv"],
            use_post_quant_conv=vae["use_post_quant_conv"],
            mid_block_add_attention=vae["mid_block_add_attention"],
        )
    load_state_dict_strict(out, sd, f"diffusers {type(out).__name__}")
    return out.to(next(model.parameters()).dtype)


def export_diffusers(model: AsymmetricAutoencoder, out_dir: str | os.PathLike) -> Path:
    """Write a folder that `diffusers.{Asymmetric,}AutoencoderKL.from_pretrained(out_dir)` loads."""
    out_dir = Path(out_dir)
    to_diffusers(model).save_pretrained(out_dir, safe_serialization=True)
    return out_dir
