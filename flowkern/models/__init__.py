"""Whole flows: ``zs, logdet = model(x)``, ``model.inverse(zs)``, ``log_prob``, ``sample``, ``bits_per_dim``."""
from .base import FlowModel, MultiScaleFlow
from .glow import Glow
from .realnvp import RealNVP, RealNVP2d

__all__ = ["FlowModel", "Glow", "MultiScaleFlow", "RealNVP", "RealNVP2d"]
