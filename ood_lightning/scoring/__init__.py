"""The scoring contract (:mod:`.api`) and the evaluation loop that runs it (:mod:`.loop`)."""

from ood_lightning.scoring.api import ID_SPLITS, FeatureModel, FitData, Key, Outputs, Results, Scorer, pool

__all__ = ["ID_SPLITS", "FeatureModel", "FitData", "Key", "Outputs", "Results", "Scorer", "pool"]
