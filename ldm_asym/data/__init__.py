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

__all__ = [
    "PRESETS",
    "FileListDataset",
    "ImageFolderDataset",
    "ImageNetDataset",
    "MaskGenerator",
    "SkimageDataset",
    "UnusableImageError",
    "list_images",
    "load_image",
    "load_mask",
]
