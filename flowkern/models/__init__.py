"""Whole flows: ``zs, logdet = model(x)``, ``model.inverse(zs)``, ``log_prob``, ``sample``, ``bits_per_dim``."""
from .base import FlowModel, MultiScaleFlow
from .ffjord import FFJORD
from .glow import Glow
from .realnvp import RealNVP, RealNVP2d

__all__ = ["FFJORD", "FlowModel", "Glow", "MultiScaleFlow", "RealNVP", "RealNVP2d"]
