"""ood-lightning: train, sweep and compare density-based and generative OOD detectors."""

__version__ = "0.1.0"
