from ood_lightning.methods.base import OODMethod
from ood_lightning.methods.classifier import Classifier
from ood_lightning.methods.dhm.model import DeepHybridModel
from ood_lightning.methods.godin.model import GeneralizedODIN
from ood_lightning.methods.lde.model import LatentDensity
from ood_lightning.methods.posthoc import PostHoc
from ood_lightning.methods.vae.ganvae import GANVAE
from ood_lightning.methods.vae.model import VAE

__all__ = ["OODMethod", "Classifier", "DeepHybridModel", "GANVAE", "GeneralizedODIN", "LatentDensity", "PostHoc", "VAE"]
