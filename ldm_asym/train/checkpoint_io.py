"""Crash-safe checkpoint files: a kill or a full disk never leaves a broken `last.ckpt`."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from ldm_asym.util import atomic_write

log = logging.getLogger(__name__)


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (disk full, permissions); earlier checkpoints are intact."""


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save through `atomic_write` (temporary file in the same folder, fsync, rename), then
    fsync the folder so the rename itself is durable.

    The rename is atomic on POSIX file systems, so readers see the old file or the new one, never
    half of one; streaming to disk also avoids holding a second in-memory copy of the checkpoint.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, "wb") as f:
            torch.save(obj, f)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        cause = e.__cause__ if isinstance(e.__cause__, OSError) else e
        raise CheckpointWriteError(e.errno, f"could not write checkpoint {path}: {cause.strerror or cause}; "
                                            f"the previous checkpoints in {path.parent} are intact") from e


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        atomic_torch_save(checkpoint, path)


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why training cannot resume from `path` (None when it loads as a training checkpoint). Cheap:
    torch.load memory-maps the file."""
    try:
        obj = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as e:  # noqa: BLE001 - truncated, empty, another format: say what torch said
        return f"it cannot be read ({type(e).__name__}: {str(e)[:200]}); truncated or not a checkpoint"
    if not isinstance(obj, dict) or not {"state_dict", "global_step"} <= obj.keys():
        return "it is not a training checkpoint (no state_dict / global_step)"
    return None


def usable_checkpoint(ckpt: Path, fallback: bool) -> Path:
    """`ckpt` if it loads; else, with `fallback`, the newest intact `step-*.ckpt` beside it (logged),
    and without, an error that names both files."""
    problem = checkpoint_problem(ckpt)
    if problem is None:
        return ckpt
    why = f"cannot resume from {ckpt}: {problem}"
    intact = next((p for p in sorted(ckpt.parent.glob("step-*.ckpt"), reverse=True)
                   if p != ckpt and checkpoint_problem(p) is None), None)
    if intact is None:
        raise CheckpointReadError(f"{why}; no intact step-*.ckpt in {ckpt.parent} either")
    if not fallback:
        raise CheckpointReadError(f"{why}. The newest intact checkpoint is {intact}: resume with -r {intact}")
    log.warning("%s; resuming from the newest intact checkpoint, %s", why, intact)
    print(f"warning: {why}; resuming from the newest intact checkpoint, {intact}")
    return intact


class CheckpointReadError(ValueError):
    """A checkpoint to resume from is damaged or not a training checkpoint."""
