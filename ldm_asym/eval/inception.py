"""Set metrics on Inception features, through torchmetrics: FID and the Inception Score.

torchmetrics' `FrechetInceptionDistance` and `InceptionScore` are given our locally loaded network
(`models.build_inception`, or any module in tests) as `feature`, so they never build or download
their own. Images in [-1, 1] are quantised to uint8 first, as saved images would be.
"""

from __future__ import annotations

import warnings
from typing import Iterable

import torch
import torch.nn as nn

from ldm_asym.eval.models import Unavailable


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> uint8 in [0, 255], rounded (what writing a PNG and reading it back gives)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class FIDSet:
    """FID of several sets ("vanilla", "ours", ...) against one set of real images.

    One torchmetrics `FrechetInceptionDistance` per set holds that set's features; the real images
    go through the network once, into a metric of their own, whose real-image state is merged into
    each set's metric (`Metric.merge_state`) when its FID is computed.
    """

    def __init__(self, features: nn.Module, keys: Iterable[str]):
        from torchmetrics.image.fid import FrechetInceptionDistance

        features = features.eval()
        self.real = FrechetInceptionDistance(feature=features)
        self.sets = {k: FrechetInceptionDistance(feature=features) for k in keys}
        self._merged: set[str] = set()

    def to(self, device) -> "FIDSet":
        for m in (self.real, *self.sets.values()):
            m.to(device)
        return self

    def add_real(self, images: torch.Tensor) -> None:
        self.real.update(to_uint8(images), real=True)

    def add(self, key: str, images: torch.Tensor) -> None:
        self.sets[key].update(to_uint8(images), real=False)

    def count(self, key: str) -> int:
        return int(self.sets[key].fake_features_num_samples)

    def compute(self, key: str) -> float:
        """FID of set `key`; `Unavailable` with fewer than 2 images on either side."""
        n = min(self.count(key), int(self.real.real_features_num_samples))
        if n < 2:
            raise Unavailable(f"FID needs at least 2 images; got {n}")
        metric = self.sets[key]
        if key not in self._merged:  # merge_state adds: once only
            metric.merge_state(self.real)
            self._merged.add(key)
        return float(metric.compute())


def module_device(module: nn.Module) -> torch.device:
    """Where `module` lives (CPU for a module without tensors)."""
    t = next(iter([*module.parameters(), *module.buffers()]), None)
    return t.device if t is not None else torch.device("cpu")


class InceptionScoreSet:
    """torchmetrics' `InceptionScore` of the images `add`ed ([-1, 1]), with a repeatable shuffle.

    `logits` is the network with the `logits_unbiased` head. The score is exp(E KL(p(y|x) || p(y)))
    per split of the shuffled images; `compute` gives the mean and std over the `splits`.
    """

    def __init__(self, logits: nn.Module, splits: int = 10):
        from torchmetrics.image.inception import InceptionScore

        with warnings.catch_warnings():  # its notice that it keeps every image's logits in memory
            warnings.filterwarnings("ignore", message=".*save all extracted features.*")
            self.metric = InceptionScore(feature=logits.eval(), splits=splits)
        self.device, self.splits, self.n = module_device(logits), splits, 0

    def add(self, images: torch.Tensor) -> None:
        self.metric.update(to_uint8(images.to(self.device)))
        self.n += images.shape[0]

    def compute(self, seed: int = 0) -> dict:
        """-> {mean, std, n, splits}; `Unavailable` with fewer images than splits. `seed` fixes the shuffle."""
        if self.n < self.splits:
            raise Unavailable(f"the Inception Score with {self.splits} splits needs at least {self.splits} "
                              f"images; got {self.n}")
        with torch.random.fork_rng(devices=[]):  # torchmetrics shuffles with the global RNG
            torch.manual_seed(seed)
            mean, std = self.metric.compute()
        return {"mean": float(mean), "std": float(std), "n": self.n, "splits": self.splits}
