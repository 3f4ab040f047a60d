"""ldm-asym: the Asymmetric VQGAN decoder (Zhu et al. 2023) for Stable Diffusion's KL VAEs."""

from ldm_asym.interop import load_autoencoder
from ldm_asym.models import AsymmetricAutoencoder, AsymmetricDecoder

__version__ = "0.1.0"
__all__ = ["AsymmetricAutoencoder", "AsymmetricDecoder", "load_autoencoder", "__version__"]
