from ldm_asym.models.autoencoder import AsymmetricAutoencoder
from ldm_asym.models.decoder import BLEND_MODES, AsymmetricDecoder, ConditionBranch
from ldm_asym.models.tiling import Tiling

__all__ = ["AsymmetricAutoencoder", "AsymmetricDecoder", "ConditionBranch", "BLEND_MODES", "Tiling"]
