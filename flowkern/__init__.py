"""flowkern: fused kernels and PyTorch layers for normalizing flows (Glow, RealNVP; FFJORD beside them).

Layers and models call :mod:`flowkern.functional`, which runs each fused op on the active backend:
``set_backend(name)``, ``get_backend()``, ``use_backend(name)`` and ``available_backends()``.
``accelerate(model)`` runs the layers of a normflows, FrEIA or nflows model on the same ops.
"""
from . import data, functional, nn, reference
from .backends import BackendUnavailable, available_backends, get_backend, set_backend, use_backend
from .dropin import accelerate, acceleration_report
from .models import FFJORD, Glow, RealNVP, RealNVP2d

__version__ = "0.1.0"


def load_run(path, device="cpu"):
    """The model a ``python -m flowkern.train`` run folder holds, rebuilt from its checkpoint: see
    :func:`flowkern.train.load_run`."""
    from .train import load_run as load

    return load(path, device)


__all__ = [
    "BackendUnavailable", "FFJORD", "Glow", "RealNVP", "RealNVP2d", "accelerate", "acceleration_report",
    "available_backends", "data", "functional",
    "get_backend", "load_run", "nn", "reference", "set_backend", "use_backend",
]
