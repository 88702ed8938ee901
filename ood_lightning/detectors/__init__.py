"""Post-hoc OOD detectors: :class:`~ood_lightning.scoring.api.Scorer` subclasses (higher score =
more ID) that fit on ID outputs of a trained classifier; configs in ``conf/detectors/`` name the classes."""

from ood_lightning.detectors.activation_shaping import ASH, SCALE
from ood_lightning.detectors.dice import DICE
from ood_lightning.detectors.energy import Energy, energy_score
from ood_lightning.detectors.fdbd import FDBD
from ood_lightning.detectors.gradnorm import GradNorm
from ood_lightning.detectors.kl_matching import KLMatching
from ood_lightning.detectors.knn import KNN
from ood_lightning.detectors.logit_scores import GEN, Entropy, MaxLogit
from ood_lightning.detectors.lsgm import LSGM
from ood_lightning.detectors.mahalanobis import Mahalanobis, MahalanobisTuned, fit_logistic_weights
from ood_lightning.detectors.msp import MSP
from ood_lightning.detectors.nnguide import NNGuide
from ood_lightning.detectors.odin import ODIN
from ood_lightning.detectors.react import ReAct
from ood_lightning.detectors.rmds import RMDS
from ood_lightning.detectors.she import SHE
from ood_lightning.detectors.temperature_scaling import TemperatureScaling
from ood_lightning.detectors.vim import ViM

__all__ = [
    "ASH", "DICE", "FDBD", "GEN", "KNN", "LSGM", "MSP", "ODIN", "RMDS", "SCALE", "SHE", "Energy", "Entropy",
    "GradNorm", "KLMatching", "Mahalanobis", "MahalanobisTuned", "MaxLogit", "NNGuide", "ReAct",
    "TemperatureScaling", "ViM", "energy_score", "fit_logistic_weights",
]
