from ood_lightning.methods.base import OODMethod
from ood_lightning.methods.classifier import Classifier
from ood_lightning.methods.dhm import DeepHybridModel
from ood_lightning.methods.ganvae import GANVAE
from ood_lightning.methods.godin import GeneralizedODIN
from ood_lightning.methods.lde import LatentDensity
from ood_lightning.methods.posthoc import PostHoc
from ood_lightning.methods.vae import VAE

__all__ = ["OODMethod", "Classifier", "DeepHybridModel", "GANVAE", "GeneralizedODIN", "LatentDensity", "PostHoc", "VAE"]
