"""Datasets (paper crops + LaMa masks) and mask generators for training the asymmetric decoder."""

from ldm_asym.data.datasets import (
    FileListDataset,
    ImageFolderDataset,
    ImageNetDataset,
    SkimageDataset,
    UnusableImageError,
    list_images,
    load_image,
)
from ldm_asym.data.masks import PRESETS, MaskGenerator, load_mask
from ldm_asym.data.shards import ShardDataset

__all__ = [
    "PRESETS",
    "FileListDataset",
    "ImageFolderDataset",
    "ImageNetDataset",
    "MaskGenerator",
    "ShardDataset",
    "SkimageDataset",
    "UnusableImageError",
    "list_images",
    "load_image",
    "load_mask",
]
