"""The networks behind the metrics (LPIPS, Inception, CLIP), loaded from local files only.

These machines have no internet, and every metric library would otherwise download its weights on
first use. Each builder checks for the file or folder first and raises `Unavailable`, naming what
is missing and where to put it; the tasks report that metric as unavailable with the reason.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from ldm_asym import metrics as M

LPIPS_NETS = ("vgg", "alex")
# What torch-fidelity (and torchmetrics' FID / Inception Score through it) downloads into the torch hub cache.
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_FEATURES = {"2048": "2048-d pool features (FID)", "logits_unbiased": "1008 logits (Inception Score)"}
CLIP_FOLDER = "a local copy of openai/clip-vit-base-patch32 (config.json, model.safetensors, preprocessor_config.json)"


class Unavailable(Exception):
    """A metric cannot be computed here; the message is the reason reported for it."""


def build_lpips(random_trunk: bool = False) -> tuple[dict, dict[str, str]]:
    """-> ({net: MaskedLPIPS}, {metric: reason}) for the nets whose weights are missing."""
    nets, unavailable = {}, {}
    for net in LPIPS_NETS:
        try:
            nets[net] = M.MaskedLPIPS(net, pretrained=not random_trunk)
        except FileNotFoundError as e:
            unavailable[f"lpips_{net}"] = unavailable[f"lpips_{net}_band"] = str(e)
    return nets, unavailable


def build_inception(weights: str | os.PathLike | None = None, feature: str = "2048") -> nn.Module:
    """torchmetrics' Inception (torch-fidelity's `inception-v3-compat`), from a local weights file only.

    `feature`: "2048" (pool features, for FID) or "logits_unbiased" (for the Inception Score). The
    module takes uint8 B×3×H×W images (it resizes to 299 itself). `weights` None looks for
    torch-fidelity's own file in the torch hub cache. Raises `Unavailable`.
    """
    if feature not in INCEPTION_FEATURES:
        raise ValueError(f"feature must be one of {', '.join(INCEPTION_FEATURES)}; got {feature!r}")
    if weights is None:
        weights = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
        if not weights.is_file():
            raise Unavailable(f"no Inception weights: pass --inception-weights PATH ({INCEPTION_FILE}, the "
                              f"torch-fidelity / torchmetrics FID network; not in {weights.parent})")
    elif not Path(weights).is_file():
        raise Unavailable(f"Inception weights file not found: {weights} (--inception-weights)")
    try:
        import torch_fidelity  # noqa: F401  (torchmetrics' Inception comes from it)
        from torchmetrics.image.fid import NoTrainInceptionV3
    except ImportError as e:
        raise Unavailable(f"FID / Inception Score need torch-fidelity (pip install torch-fidelity): {e}") from e
    # With a weights path torch-fidelity only torch.load()s it; without one it would download.
    net = NoTrainInceptionV3(name="inception-v3-compat", features_list=[feature],
                             feature_extractor_weights_path=str(weights))
    if feature == "2048":
        net.num_features = 2048  # spares torchmetrics' FID a dummy forward pass to find the width
    return net


class ClipImageEncoder(nn.Module):
    """CLIP image embeddings (`CLIPVisionModelWithProjection.image_embeds`) of images in [0, 1].

    Normalised with the folder's `CLIPImageProcessor` mean and std; the caller resizes to
    `image_size` (224 for ViT-B/32), as the COCOEE protocol resizes before normalising.
    """

    def __init__(self, model: nn.Module, mean, std, image_size: int):
        super().__init__()
        self.model, self.image_size = model.eval().requires_grad_(False), image_size
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    @torch.no_grad()
    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        if images01.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"CLIP expects {self.image_size}x{self.image_size} images; got {tuple(images01.shape)}")
        pixels = (images01.float() - self.mean) / self.std
        return self.model(pixel_values=pixels).image_embeds.float()


def build_clip(folder: str | os.PathLike | None) -> ClipImageEncoder:
    """The CLIP image tower + projection and its processor's normalisation, from a local folder only.

    Raises `Unavailable` naming the folder when it is not given, missing or incomplete.
    """
    if folder is None:
        raise Unavailable(f"no CLIP model: pass --clip DIR, {CLIP_FOLDER}")
    folder = Path(folder)
    if not folder.is_dir():
        raise Unavailable(f"CLIP folder not found: {folder} (--clip DIR: {CLIP_FOLDER})")
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # no "some weights unused" notes: a CLIPModel folder has a text tower too
    try:
        # local_files_only: a folder that lacks a file fails here instead of trying the Hub.
        model = CLIPVisionModelWithProjection.from_pretrained(folder, local_files_only=True)
        processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise Unavailable(f"cannot load CLIP from {folder} (--clip DIR: {CLIP_FOLDER}): {e}") from e
    finally:
        hf_logging.set_verbosity(verbosity)
    return ClipImageEncoder(model, processor.image_mean, processor.image_std, model.config.image_size)
