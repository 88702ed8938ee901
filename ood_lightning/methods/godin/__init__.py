"""Generalized ODIN: the decomposed-confidence classifier (:mod:`.model`) and its input perturbation
(:mod:`.perturbation`, a scorer configured under ``detectors=godin``)."""

from ood_lightning.methods.godin.model import GeneralizedODIN
from ood_lightning.methods.godin.perturbation import GODINPerturbation

__all__ = ["GODINPerturbation", "GeneralizedODIN"]
