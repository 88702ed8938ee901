"""LDE (latent density estimation): a normalizing flow on a frozen classifier's features
(:mod:`.latent_flow`) and the post-hoc method that fits its variants (:mod:`.model`)."""

from ood_lightning.methods.lde.latent_flow import LatentFlowDetector
from ood_lightning.methods.lde.model import LatentDensity

__all__ = ["LatentDensity", "LatentFlowDetector"]
