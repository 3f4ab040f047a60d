"""Config files: loading (`inherit:`), and every check that runs before data or weights load.

`validate` reports unknown keys, wrong types and invalid choices anywhere in a merged config: in
`{target, params}` nodes (against the target's signature), in nested dicts that reach a constructor
through `**params` (the autoencoder, its `vae_config`, a dataset's `masks`), in `lightning.trainer`
(against `pytorch_lightning.Trainer`) and in `lightning.callbacks`.
"""

from __future__ import annotations

import inspect
import os
import types
import typing
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

TOP_LEVEL = {"model", "data", "lightning", "paths"}
LIGHTNING_KEYS = {"trainer", "logger", "callbacks", "ddp_timeout_s"}
CALLBACK_KEYS = {"checkpoint", "images"}


# ---------------------------------------------------------------------- config checks
def _signature(target: str) -> tuple[set[str] | None, dict]:
    """(accepted keyword names or None for **kwargs, resolved type hints) of a target."""
    from ldm_asym.util import get_obj_from_str

    obj = get_obj_from_str(target)
    fn = obj.__init__ if inspect.isclass(obj) else obj
    sig = inspect.signature(fn)
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable annotations in third-party code: check names only
        hints = {}
    if any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
        return None, hints
    return {n for n in sig.parameters if n != "self"}, hints


def _type_problem(hint: Any, value: Any) -> str | None:
    """Why `value` does not fit a simple annotation (bool/int/float/str/Literal/Optional), or None."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return None if value in args else f"must be one of {', '.join(map(str, args))}; got {value!r}"
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        problems = [_type_problem(a, value) for a in args if a is not type(None)]
        return None if any(p is None for p in problems) else problems[0]
    checks = {bool: (lambda v: isinstance(v, bool), "true or false"),
              int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
              float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
              str: (lambda v: isinstance(v, str), "a string")}
    if hint in checks and value is not None:
        ok, what = checks[hint]
        return None if ok(value) else f"must be {what}; got {value!r}"
    return None


# Nested dicts that reach a constructor through `**params` (not `{target, params}` nodes):
# (owner class, its parameter, the constructor the dict's keys go to, keys the owner passes itself).
_NESTED = (
    ("ldm_asym.train.module.AsymmetricVQGAN", "autoencoder", "ldm_asym.models.autoencoder.AsymmetricAutoencoder",
     {"freeze_encoder"}),
    ("ldm_asym.models.autoencoder.AsymmetricAutoencoder", "vae_config", "diffusers.AutoencoderKL", set()),
    ("ldm_asym.models.autoencoder.AsymmetricAutoencoder", "decoder", "ldm_asym.models.decoder.AsymmetricDecoder",
     set()),
    ("ldm_asym.data", "masks", "ldm_asym.data.masks.MaskGenerator", {"size"}),  # every dataset with `masks`
)
# `vae_config` takes any diffusers AutoencoderKL or AsymmetricAutoencoderKL config.json.
_VAE_CLASSES = ("diffusers.AutoencoderKL", "diffusers.AsymmetricAutoencoderKL")


def _nested_spec(owner: Any, key: str) -> tuple[str, set[str]] | None:
    """(constructor target, keys the owner passes itself) when `owner(key=<dict>)` unpacks the dict."""
    from ldm_asym.util import get_obj_from_str

    for owner_path, param, target, passed in _NESTED:
        if key != param:
            continue
        if owner_path == "ldm_asym.data":
            if getattr(owner, "__module__", "").startswith("ldm_asym.data"):
                return target, passed
            continue
        try:
            cls = get_obj_from_str(owner_path)
        except ValueError:
            continue
        if inspect.isclass(owner) and issubclass(owner, cls):
            return target, passed
    return None


def _constructor(target: str) -> tuple[Any, set[str] | None, dict]:
    """(object, accepted keyword names or None, type hints) of a constructor named in `_NESTED`."""
    from ldm_asym.util import get_obj_from_str

    if target == "diffusers.AutoencoderKL":
        names, hints = set(), {}
        for t in _VAE_CLASSES:
            n, h = _signature(t)
            names |= n or set()
            hints = {**h, **hints}
        return get_obj_from_str(target), names, hints
    valid, hints = _signature(target)
    return get_obj_from_str(target), valid, hints


def _is_mapping(value: Any) -> bool:
    return isinstance(value, (DictConfig, dict))


def _check_params(owner: Any, name: str, params: Any, valid: set[str] | None, hints: dict, where: str,
                  passed: frozenset | set = frozenset()) -> list[str]:
    """Keys and simple types of the kwargs `params` for `name` (whose object is `owner`), recursively."""
    problems = []
    for key in params:
        value_is_interp = OmegaConf.is_interpolation(params, key) if isinstance(params, DictConfig) else False
        if key in passed:
            problems.append(f"{where}.{key}: set by {name} itself; remove it here")
            continue
        if valid is not None and key not in valid and not (name.startswith("diffusers.") and str(key).startswith("_")):
            problems.append(f"{where}.{key}: unknown parameter of {name} (valid: {', '.join(sorted(valid - set(passed)))})")
            continue
        if value_is_interp:
            continue
        value = params[key]
        spec = _nested_spec(owner, key)
        if spec is not None and value is not None and not (_is_mapping(value) and "target" in value):
            target, inner_passed = spec
            if not _is_mapping(value):
                problems.append(f"{where}.{key}: must be a mapping of {target.rsplit('.', 1)[-1]} arguments; got {value!r}")
                continue
            try:
                obj, inner_valid, inner_hints = _constructor(target)
            except ValueError as e:
                problems.append(f"{where}.{key}: {e}")
                continue
            problems += _check_params(obj, target, value, inner_valid, inner_hints, f"{where}.{key}", inner_passed)
            continue
        if key in hints and not isinstance(value, (DictConfig, ListConfig)):
            why = _type_problem(hints[key], value)
            if why:
                problems.append(f"{where}.{key}: {why}")
                continue
        problems += check_config(value, f"{where}.{key}")
    return problems


def check_config(cfg: Any, where: str = "") -> list[str]:
    """Unknown keys, wrong simple types and unimportable targets anywhere in `{target, params}` nodes
    (typos), and in the nested dicts those params unpack into a constructor (see `_NESTED`)."""
    from ldm_asym.util import get_obj_from_str

    problems = []
    if isinstance(cfg, DictConfig):
        if "target" in cfg or "params" in cfg:
            if "target" not in cfg:
                return [f"{where or 'config'}: has params but no 'target'"]
            extra = set(cfg.keys()) - {"target", "params"}
            if extra:
                problems.append(f"{where}: unknown keys {sorted(extra)} next to target/params")
            if OmegaConf.is_interpolation(cfg, "target"):
                return problems
            if not isinstance(cfg.target, str):
                return problems + [f"{where}.target: must be a dotted class path (a string); got {cfg.target!r}"]
            try:
                valid, hints = _signature(cfg.target)
                owner = get_obj_from_str(cfg.target)
            except ValueError as e:
                return problems + [f"{where}.target: {e}"]
            params = cfg.get("params")
            if params is None:
                return problems
            if not isinstance(params, DictConfig):
                return problems + [f"{where}.params: must be a mapping of {cfg.target} arguments; got {params!r}"]
            problems += _check_params(owner, cfg.target, params, valid, hints, f"{where}.params")
        else:
            for key in cfg:
                problems += check_config(cfg[key], f"{where}.{key}".lstrip("."))
    elif isinstance(cfg, ListConfig):
        for i, item in enumerate(cfg):
            problems += check_config(item, f"{where}[{i}]")
    return problems


# `lightning.callbacks.*`: the keys build_trainer (cli.py) reads, and their types.
CALLBACK_PARAMS = {"checkpoint": {"every_n_steps": int}, "images": {"every_n_steps": int, "max_images": int}}


def _check_mapping(value: Any, where: str) -> str | None:
    if value is None or isinstance(value, DictConfig):
        return None
    return f"{where}: must be a mapping (key: value); got {value!r}"


def validate(config: DictConfig) -> None:
    import pytorch_lightning as pl

    from ldm_asym.train.module import FP16_PRECISIONS, FP16_WHY

    if not isinstance(config, DictConfig):
        raise ValueError(f"config problems:\n  the config must be a mapping of sections; got {type(config).__name__}")
    problems = [f"unknown top-level key {k!r} (valid: {', '.join(sorted(TOP_LEVEL))})"
                for k in config if k not in TOP_LEVEL]
    for key in ("model", "data"):
        if key not in config or config[key] is None:
            problems.append(f"config has no '{key}' section")
        elif not isinstance(config[key], DictConfig):
            problems.append(f"{key}: must be a mapping with target and params; got {config[key]!r}")
    for key in ("lightning", "paths"):
        if key in config and not OmegaConf.is_interpolation(config, key):
            problems += [p for p in [_check_mapping(config[key], key)] if p]
    light = config.get("lightning")
    light = light if isinstance(light, DictConfig) else OmegaConf.create()
    problems += [f"lightning.{k}: unknown key (valid: {', '.join(sorted(LIGHTNING_KEYS))})"
                 for k in light if k not in LIGHTNING_KEYS]
    for key in ("trainer", "callbacks", "logger"):
        if key in light and not OmegaConf.is_interpolation(light, key):
            problems += [p for p in [_check_mapping(light[key], f"lightning.{key}")] if p]
    if "ddp_timeout_s" in light and not OmegaConf.is_interpolation(light, "ddp_timeout_s"):
        why = _type_problem(float, light.ddp_timeout_s)
        if why:
            problems.append(f"lightning.ddp_timeout_s: {why}")
    trainer = light.get("trainer") if isinstance(light.get("trainer"), DictConfig) else OmegaConf.create()
    sig = inspect.signature(pl.Trainer.__init__)
    trainer_keys = set(sig.parameters) - {"self"}
    try:
        trainer_hints = typing.get_type_hints(pl.Trainer.__init__)
    except Exception:  # noqa: BLE001 - unresolvable annotations: check names only
        trainer_hints = {}
    for k in trainer:
        if k not in trainer_keys:
            problems.append(f"lightning.trainer.{k}: not a Trainer argument")
        elif k in trainer_hints and not OmegaConf.is_interpolation(trainer, k):
            value = trainer[k]
            if not isinstance(value, (DictConfig, ListConfig)):
                why = _type_problem(trainer_hints[k], value)
                if why:
                    problems.append(f"lightning.trainer.{k}: {why}")
    callbacks = light.get("callbacks") if isinstance(light.get("callbacks"), DictConfig) else OmegaConf.create()
    for name in callbacks:
        if name not in CALLBACK_KEYS:
            problems.append(f"lightning.callbacks.{name}: unknown (valid: {', '.join(sorted(CALLBACK_KEYS))})")
            continue
        node = callbacks[name]
        if not isinstance(node, DictConfig):
            if node is not None:
                problems.append(f"lightning.callbacks.{name}: must be a mapping with keys "
                                f"{', '.join(sorted(CALLBACK_PARAMS[name]))}; got {node!r}")
            continue
        for key in node:
            if key not in CALLBACK_PARAMS[name]:
                problems.append(f"lightning.callbacks.{name}.{key}: unknown key "
                                f"(valid: {', '.join(sorted(CALLBACK_PARAMS[name]))})")
            elif not OmegaConf.is_interpolation(node, key):
                why = _type_problem(CALLBACK_PARAMS[name][key], node[key])
                if why is None and node[key] is None:
                    why = "must be an integer; got None"
                if why:
                    problems.append(f"lightning.callbacks.{name}.{key}: {why}")
    precision = ("" if "precision" not in trainer or OmegaConf.is_interpolation(trainer, "precision")
                 else str(trainer.precision))
    if precision in FP16_PRECISIONS:  # Lightning would even swap it for bf16 on CPU, silently
        problems.append(f"lightning.trainer.precision={precision} is not supported: {FP16_WHY}")
    for key in ("model", "data"):
        if isinstance(config.get(key), DictConfig):
            problems += check_config(config[key], key)
    if isinstance(light.get("logger"), DictConfig):
        problems += check_config(light.logger, "lightning.logger")
    if problems:
        raise ValueError("config problems:\n  " + "\n  ".join(problems))


def load_config(path: str | os.PathLike, _chain: tuple[Path, ...] = ()) -> DictConfig:
    """A YAML config; `inherit: other.yaml` (relative to this file) is merged underneath it first,
    so variants state only what differs from the recipe (one place for each fact)."""
    path = Path(path)
    by = f" (inherited by {_chain[-1]})" if _chain else ""
    if not path.is_file():
        raise FileNotFoundError(f"config not found: {path}{by}")
    if path.resolve() in _chain:
        raise ValueError(f"config {path}: `inherit:` loop ({' -> '.join(map(str, (*_chain, path.resolve())))})")
    try:
        cfg = OmegaConf.load(path)
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - yaml / OmegaConf / decoding errors: name the file
        detail = str(e).strip().replace("\n", " ")
        raise ValueError(f"config {path} is not valid YAML ({type(e).__name__}: {detail})") from e
    if not isinstance(cfg, DictConfig):
        raise ValueError(f"config {path}: the top level must be a mapping (model:, data:, lightning:); "
                         f"got a {type(cfg).__name__.replace('Config', '').lower()}")
    if len(cfg) == 0:
        raise ValueError(f"config {path} is empty (no keys; only comments or blank lines?)")
    parent = cfg.pop("inherit", None)
    if parent is None:
        return cfg
    if not isinstance(parent, str):
        raise ValueError(f"config {path}: `inherit:` must be a file name; got {parent!r}")
    return merge(load_config(path.parent / parent, (*_chain, path.resolve())), cfg)


def merge(*configs: DictConfig) -> DictConfig:
    """OmegaConf.merge, except that a later config which swaps a `target` also drops the earlier
    `params` beside it: the old class's arguments (ImageNetDataset's `split`) mean nothing to the new
    one (ShardDataset). A later config that keeps the target merges its params as usual."""
    out = configs[0]
    for cfg in configs[1:]:
        out = OmegaConf.merge(_drop_swapped_params(out, cfg), cfg)
    return out


def _drop_swapped_params(old: DictConfig, new: DictConfig) -> DictConfig:
    if not isinstance(old, DictConfig) or not isinstance(new, DictConfig):
        return old
    keys = [k for k in new.keys() if k in old]
    swapped = "target" in keys and OmegaConf.select(new, "target") != OmegaConf.select(old, "target")
    if not swapped and not any(isinstance(new._get_node(k), DictConfig) for k in keys):
        return old
    old = old.copy()
    if swapped and "params" in old:
        old.pop("params")
    for k in keys:
        if k in old and isinstance(old._get_node(k), DictConfig) and isinstance(new._get_node(k), DictConfig):
            old[k] = _drop_swapped_params(old[k], new[k])
    return old


def check_paths(config: DictConfig) -> None:
    """Missing SD VAE / data folders fail here, before any weights are loaded or files scanned."""
    from ldm_asym.data.shards import INDEX, REMOTE
    from ldm_asym.interop import missing_source_message

    src = OmegaConf.select(config, "model.params.vae_source")
    if src is not None:
        if not isinstance(src, str):
            raise ValueError(f"model.params.vae_source must be a path or a Hub id (a string); got {src!r}")
        why = missing_source_message(src)
        if why:
            raise FileNotFoundError(
                f"SD VAE {why}. Point model.params.vae_source (or paths.sd_vae) at a diffusers VAE "
                f"folder, an SD checkpoint, or a Hub id such as stabilityai/sd-vae-ft-mse")
    for split in ("train", "validation"):
        root = OmegaConf.select(config, f"data.params.{split}.params.root")
        if root is not None and not Path(str(root)).is_dir():
            raise FileNotFoundError(
                f"{split} data folder not found: {root}. Set data.params.{split}.params.root "
                f"(or paths.imagenet for the ImageNet configs)")
        shards = OmegaConf.select(config, f"data.params.{split}.params.input_dir")
        if shards is not None and not str(shards).startswith(REMOTE) and not (Path(str(shards)) / INDEX).is_file():
            raise FileNotFoundError(
                f"{split} shards not found: {shards} has no {INDEX}. Set data.params.{split}.params.input_dir "
                f"(or paths.shards / paths.shards_val in the presets); write shards with scripts/make_shards.py")
