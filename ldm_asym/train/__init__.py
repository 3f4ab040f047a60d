from ldm_asym.train.data import DataModule, ResumableSampler
from ldm_asym.train.module import AsymmetricVQGAN

__all__ = ["AsymmetricVQGAN", "DataModule", "ResumableSampler"]
