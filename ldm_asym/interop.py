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
# Our training checkpoints carry this key: the model config and, optionally, EMA weights.
META_KEY = "ldm_asym"


class WeightsMismatchError(ValueError):
    """A checkpoint does not fit the model: lists missing, unexpected and mis-shaped tensors."""


# ---------------------------------------------------------------------- reading files
def read_checkpoint(path: str | os.PathLike, trust_pickle: bool = False) -> dict:
    """Load a `.safetensors` file or a torch pickle (`weights_only=True` unless `trust_pickle`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint {path} is empty (0 bytes): an interrupted download or save?")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for truncated headers
            raise ValueError(f"cannot read {path} as safetensors (truncated or not a safetensors file): {e}") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except __import__("pickle").UnpicklingError as e:
        raise ValueError(
            f"{path} needs arbitrary code execution to unpickle (it stores Python objects, not just tensors). "
            f"Load it with trust_pickle=True (CLI: --trust-pickle) only if you trust where it came from. ({e})"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"cannot read checkpoint {path} (truncated or not a torch checkpoint): {e}") from e


def split_checkpoint(obj: Mapping[str, Any], use_ema: bool = False) -> tuple[dict, dict]:
    """-> (autoencoder state dict in whatever layout the file uses, our metadata or {})."""
    meta = dict(obj.get(META_KEY) or {}) if isinstance(obj, Mapping) else {}
    sd = obj.get("state_dict", obj) if isinstance(obj, Mapping) else None
    if not isinstance(sd, Mapping) or not any(torch.is_tensor(v) for v in sd.values()):
        raise ValueError("checkpoint holds no tensors (not a model checkpoint)")
    ema = {k[len("ema_decoder."):]: v for k, v in sd.items() if k.startswith("ema_decoder.")}
    if use_ema and not ema:
        raise ValueError("use_ema=True, but this checkpoint holds no EMA weights (train with ema_decay)")
    prefix = next(
        (p for p in VAE_PREFIXES if any(k.startswith((p + "encoder.", p + "decoder.")) for k in sd)), None
    )
    if prefix is None:
        raise ValueError(
            "no VAE weights found: expected keys starting with encoder./decoder. (bare VAE) or with one of "
            f"{', '.join(repr(p) for p in VAE_PREFIXES if p)}; first keys are {list(sd)[:5]}"
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


def infer_config(sd: Mapping[str, torch.Tensor]) -> dict:
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


def config_from_diffusers(cfg: Mapping[str, Any]) -> dict:
    """diffusers `AutoencoderKL` / `AsymmetricAutoencoderKL` config.json -> our model config."""
    name = cfg.get("_class_name")
    if name == "AsymmetricAutoencoderKL":
        up, layers, blend = cfg["up_block_out_channels"], cfg["layers_per_up_block"], "add"
    elif name == "AutoencoderKL":
        up, layers, blend = cfg["block_out_channels"], cfg["layers_per_block"], "none"
        if not cfg.get("mid_block_add_attention", True):
            raise ValueError("VAEs without decoder mid-block attention are not supported")
    else:
        raise ValueError(f"expected an AutoencoderKL or AsymmetricAutoencoderKL config, got _class_name={name!r}")
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
        config = config_from_diffusers(json.loads(cfg_file.read_text()))
        return dict(read_checkpoint(weights)), config, {}
    if path.exists() or path.suffix in (".ckpt", ".safetensors", ".pt", ".pth", ".bin"):
        raise FileNotFoundError(f"checkpoint not found: {path}")  # a file path handled by the caller
    if HUB_ID.match(str(source)):
        return _resolve(_download(str(source)))
    raise FileNotFoundError(f"{source!r} is neither a file, a folder, nor a Hugging Face Hub id (org/name)")


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        patterns = [f"{sub}{f}" for sub in ("", "vae/") for f in ("config.json", WEIGHT_FILES[0])]
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:
        raise FileNotFoundError(
            f"could not fetch {repo_id!r} from the Hugging Face Hub ({type(e).__name__}: {e}). Offline? On a "
            f"machine with internet run `hf download {repo_id} --include 'config.json' "
            f"'diffusion_pytorch_model.safetensors' 'vae/*' --local-dir DIR`, copy DIR here and pass its path."
        ) from e


def load_weights(source: str | os.PathLike, trust_pickle: bool = False, use_ema: bool = False):
    """Any supported source -> (diffusers-layout state dict, config or None, metadata)."""
    path = Path(source)
    if path.is_file():
        sd, meta = split_checkpoint(read_checkpoint(path, trust_pickle), use_ema=use_ema)
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
    if vae is not None:
        vae_sd, vae_config, _ = load_weights(vae, trust_pickle=trust_pickle)
        vae_config = vae_config or infer_config(vae_sd)
        sd = {k: v for k, v in sd.items() if k.startswith("decoder.")}
        sd.update({k: v for k, v in vae_sd.items() if not k.startswith("decoder.")})
        config = {"vae_config": vae_config["vae_config"], "decoder": (config or {}).get("decoder") or infer_decoder_config(sd)}
    config = apply_overrides(config or infer_config(sd), overrides)
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
