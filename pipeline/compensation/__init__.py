"""Low-rank compensation: EoRA, SVD and ESPACE paths (compensation/methods.py holds the registry)."""
from lpc.pipeline.compensation.methods import COMPENSATION_METHODS, LayerInputs, LowRankPath

__all__ = ["COMPENSATION_METHODS", "LayerInputs", "LowRankPath"]
