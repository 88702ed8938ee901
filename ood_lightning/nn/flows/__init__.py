"""Normalising flows on feature vectors; every flow has ``forward(h) -> (z, logdet)`` and ``log_prob(h) -> [B]``."""

from ood_lightning.nn.flows.coupling import FLOWS, NflowsFlow, glow, maf, realnvp
from ood_lightning.nn.flows.residual import LipSwish, ResidualBlock, ResidualFlow

__all__ = ["FLOWS", "LipSwish", "NflowsFlow", "ResidualBlock", "ResidualFlow", "glow", "maf", "realnvp"]
