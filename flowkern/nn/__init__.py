"""Flow layers. Each maps ``y, logdet = layer(x)`` with ``logdet`` of shape (N,) and ``x = layer.inverse(y)``."""
from .actnorm import ActNorm
from .continuous import ConcatSquashConvNet, ConcatSquashMLP, ContinuousFlow
from .conditioners import GlowConditioner, MLPConditioner, ResNetConditioner
from .coupling import AdditiveCoupling, AffineCoupling
from .flowstep import ActNormConv1x1, FlowSequential, FlowStep
from .invconv import InvConv1x1
from .memory_saving import ReconstructionWarning, Unit
from .split import Gaussianize, Split
from .squeeze import Squeeze

__all__ = [
    "ActNorm", "ActNormConv1x1", "AdditiveCoupling", "AffineCoupling", "ConcatSquashConvNet", "ConcatSquashMLP",
    "ContinuousFlow", "FlowSequential", "FlowStep", "Gaussianize",
    "GlowConditioner", "InvConv1x1", "MLPConditioner", "ReconstructionWarning", "ResNetConditioner", "Split",
    "Squeeze", "Unit",
]
