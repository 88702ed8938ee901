"""Normalising flows on feature vectors; every flow has ``forward(h) -> (z, logdet)`` and ``log_prob(h) -> [B]``."""

from ood_lightning.nn.flows.residual import LipSwish, ResidualBlock, ResidualFlow

__all__ = ["LipSwish", "ResidualBlock", "ResidualFlow"]
