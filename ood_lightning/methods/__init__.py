from ood_lightning.methods.base import OODMethod
from ood_lightning.methods.classifier import Classifier

__all__ = ["OODMethod", "Classifier"]
