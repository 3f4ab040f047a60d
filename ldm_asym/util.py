"""`target` / `params` instantiation, as in latent-diffusion and Stability's generative-models."""

from __future__ import annotations

import importlib
from typing import Any, Mapping


def get_obj_from_str(path: str) -> Any:
    module, _, name = path.rpartition(".")
    if not module:
        raise ValueError(f"target must be a dotted path like 'ldm_asym.models.AsymmetricDecoder'; got {path!r}")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import target {path!r}: {e}") from e


def instantiate_from_config(config: Mapping[str, Any], **extra: Any) -> Any:
    """Build `config["target"](**config["params"], **extra)`; `extra` fills values the YAML left out."""
    if "target" not in config:
        raise ValueError(f"config needs a 'target' key (a dotted class path); got keys {sorted(config)}")
    params = dict(config.get("params") or {})
    for key, value in extra.items():
        params.setdefault(key, value)
    return get_obj_from_str(config["target"])(**params)
