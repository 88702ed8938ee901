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

# The post-hoc baselines of issue 17 (Scorer subclasses of ood_lightning.scoring.api).
from ood_lightning.detectors.activation_shaping import ASH, SCALE  # noqa: E402
from ood_lightning.detectors.dice import DICE  # noqa: E402
from ood_lightning.detectors.fdbd import FDBD  # noqa: E402
from ood_lightning.detectors.gradnorm import GradNorm  # noqa: E402
from ood_lightning.detectors.kl_matching import KLMatching  # noqa: E402
from ood_lightning.detectors.knn import KNN  # noqa: E402
from ood_lightning.detectors.logit_scores import GEN, Entropy, MaxLogit  # noqa: E402
from ood_lightning.detectors.nnguide import NNGuide  # noqa: E402
from ood_lightning.detectors.rmds import RMDS  # noqa: E402
from ood_lightning.detectors.she import SHE  # noqa: E402
from ood_lightning.detectors.temperature_scaling import TemperatureScaling  # noqa: E402
from ood_lightning.detectors.vim import ViM  # noqa: E402

__all__ += ["ASH", "DICE", "FDBD", "GEN", "KNN", "RMDS", "SCALE", "SHE", "Entropy", "GradNorm", "KLMatching",
            "MaxLogit", "NNGuide", "TemperatureScaling", "ViM"]
