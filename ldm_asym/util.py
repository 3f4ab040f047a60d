"""`target` / `params` instantiation, as in latent-diffusion and Stability's generative-models; atomic file writes."""

from __future__ import annotations

import contextlib
import importlib
import os
import secrets
from typing import IO, Any, Iterator, Mapping


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


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs: Any) -> Iterator[IO]:
    """Write `path` all at once or not at all: `with atomic_write(p, "wb") as f: ...`.

    The data goes to a hidden temporary file in the same folder (`.NAME.<pid>.<random>.tmp`, created
    with the umask's permissions), is flushed and fsynced, and replaces `path` with os.replace only
    when the block finishes without an exception. So a crash or a kill never leaves a truncated
    `path` that looks complete or makes a rerun refuse to overwrite; an exception removes the
    temporary file. An OSError names `path`. Pillow needs `format=` when saving to the file object.
    """
    if "r" in mode or "a" in mode or "+" in mode:
        raise ValueError(f"atomic_write writes whole files; mode {mode!r} is not 'w' or 'wb'")
    path = os.fspath(path)
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise OSError(e.errno, f"cannot write {path}: {e.strerror}") from e
    try:
        with open(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError) and "cannot write" not in str(e):
            if e.errno is None:
                raise OSError(f"cannot write {path}: {e}") from e
            raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from e
        raise
