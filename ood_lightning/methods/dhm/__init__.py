"""DHM (Deep Hybrid Models): the model (:mod:`.model`), its feature-collapse and per-epoch OOD
monitors, and the studies of its spectral bound (grid volume, sensitivity)."""

from ood_lightning.methods.dhm.model import DeepHybridModel

__all__ = ["DeepHybridModel"]
