"""Post-hoc OOD detectors: :class:`~ood_lightning.scoring.api.Scorer` subclasses (higher score =
more ID) that fit on ID outputs of a trained classifier; configs in ``conf/detectors/`` name the classes."""

from ood_lightning.detectors.energy import Energy, energy_score
from ood_lightning.detectors.godin_perturbation import GODINPerturbation
from ood_lightning.detectors.latent_flow import LatentFlowDetector
from ood_lightning.detectors.lsgm import LSGM
from ood_lightning.detectors.mahalanobis import Mahalanobis, MahalanobisTuned, fit_logistic_weights
from ood_lightning.detectors.msp import MSP
from ood_lightning.detectors.odin import ODIN
from ood_lightning.detectors.react import ReAct

__all__ = [
    "MSP",
    "ODIN",
    "Energy",
    "GODINPerturbation",
    "LSGM",
    "LatentFlowDetector",
    "Mahalanobis",
    "MahalanobisTuned",
    "ReAct",
    "energy_score",
    "fit_logistic_weights",
]
