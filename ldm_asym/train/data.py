"""DataModule and a sampler whose randomness is a pure function of (seed, epoch, position).

Why: a resumed run must see exactly the samples, crops and masks the uninterrupted run would
have seen. Global RNG state does not survive DataLoader workers or a restart, so the sampler
hands each sample its own seed along with its index, and the datasets draw crops and masks
from that seed alone. The position inside the epoch is restored from the module's sample count.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler

from ldm_asym.util import instantiate_from_config


class ResumableSampler(Sampler):
    """Shuffled (or ordered), DDP-sharded, resumable; yields `(index, sample_seed)` pairs.

    The permutation depends on (seed, epoch) only, and rank r takes its elements r, r + world, ...
    so after k batches of B per rank the ranks together have consumed exactly the first k·B·world
    elements. `start` (set once, when resuming mid-epoch) skips that many elements of the
    permutation, whatever the world size was when they were consumed. Each rank gets the same
    number of samples (the remainder is dropped so every rank runs the same number of batches).
    """

    def __init__(self, length: int, shuffle: bool = True, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None):
        if length <= 0:
            raise ValueError("dataset is empty")
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        self.world_size = world_size if world_size is not None else _world_size()
        self.length, self.shuffle, self.seed = length, shuffle, seed
        self.epoch, self.start = 0, 0
        if length < self.world_size:
            raise ValueError(f"dataset of {length} samples is smaller than the world size {self.world_size}")

    def set_epoch(self, epoch: int) -> None:  # called by Lightning before every epoch
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length // self.world_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.length, generator=g) if self.shuffle else torch.arange(self.length)
        seeds = torch.randint(2**31 - 1, (self.length,), generator=g)
        start, self.start = self.start, 0
        end = start + (len(self) * self.world_size - start) // self.world_size * self.world_size
        for i in order[start + self.rank: end: self.world_size].tolist():
            yield i, int(seeds[i])


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class DataModule(pl.LightningDataModule):
    """`train` / `validation` datasets from `{target, params}` configs.

    batch_size is per process; `seed` drives the sampler (shuffle order and per-sample seeds).
    """

    def __init__(self, train: Mapping[str, Any], validation: Mapping[str, Any] | None = None,
                 batch_size: int = 10, val_batch_size: int | None = None, num_workers: int = 8,
                 seed: int = 0, pin_memory: bool = True, prefetch_factor: int | None = 4):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        self.train_cfg, self.val_cfg = train, validation
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.seed, self.pin_memory = num_workers, seed, pin_memory
        self.prefetch_factor = prefetch_factor
        self.train_set = self.val_set = None
        self.sampler: ResumableSampler | None = None
        self._skip_samples = 0

    def build(self) -> None:
        """Instantiate datasets (clear errors for missing folders) before any weights are loaded."""
        if self.train_set is None:
            train_set = instantiate_from_config(self.train_cfg)
            self._check_size(train_set, _world_size())
            self.train_set = train_set
            self.val_set = instantiate_from_config(self.val_cfg) if self.val_cfg else None

    def _check_size(self, dataset, world: int) -> None:
        """Fewer samples than one batch per process would train 0 steps and exit "successfully"."""
        n = len(dataset)
        if n // world >= self.batch_size:
            return
        name = self.train_cfg.get("target", type(dataset).__name__)
        if getattr(dataset, "root", None):
            name += f" at {dataset.root}"
        elif getattr(dataset, "split", None):
            name += f" ({dataset.split} split)"
        per = f" per process ({world} processes: {n // world} each)" if world > 1 else ""
        raise ValueError(
            f"the training dataset {name} has {n} samples, fewer than one batch of {self.batch_size}{per}: "
            f"training would run 0 steps. Add images or lower data.params.batch_size"
        )

    def setup(self, stage: str | None = None) -> None:
        self.build()

    def _loader(self, dataset, batch_size: int, sampler, drop_last: bool) -> DataLoader:
        workers = self.num_workers
        return DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, num_workers=workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(), persistent_workers=workers > 0,
            prefetch_factor=self.prefetch_factor if workers > 0 else None,
        )

    def resume_mid_epoch(self, samples_done: int) -> int:
        """Skip the first `samples_done` samples of the next epoch's permutation (all ranks together;
        called when a checkpoint is restored); returns how many will be skipped (0 if the checkpoint
        was taken at the end of an epoch, when fewer than one batch per rank is left)."""
        self.build()
        world = _world_size()
        usable = len(self.train_set) // world // self.batch_size * self.batch_size * world
        self._skip_samples = samples_done if usable - samples_done >= self.batch_size * world else 0
        return self._skip_samples

    def train_dataloader(self) -> DataLoader:
        self._check_size(self.train_set, _world_size())  # the world size is known for sure only now
        self.sampler = ResumableSampler(len(self.train_set), shuffle=True, seed=self.seed)
        self.sampler.start, self._skip_samples = self._skip_samples, 0
        return self._loader(self.train_set, self.batch_size, self.sampler, drop_last=True)

    def val_dataloader(self):
        if self.val_set is None:
            return []
        # Every rank sees a fixed shard; index-seeded masks make the set identical across runs.
        sampler = ResumableSampler(len(self.val_set), shuffle=False, seed=0)
        return self._loader(self.val_set, self.val_batch_size, sampler, drop_last=False)
