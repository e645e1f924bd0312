from torch import nn

from .actnorm import ActNorm
from .coupling import AdditiveCoupling, AffineCoupling
from .invconv import InvConv1x1


class FlowSequential(nn.Sequential):
    """A chain of flow layers: log-dets add up, ``inverse`` runs the layers backwards.

    Shapes: those of its layers; logdet (N,).
    """

    def forward(self, x):
        logdet = 0
        for layer in self:
            x, layer_logdet = layer(x)
            logdet = logdet + layer_logdet
        return x, logdet

    def inverse(self, y):
        for layer in reversed(self):
            y = layer.inverse(y)
        return y


class FlowStep(FlowSequential):
    """One step of Glow: ActNorm → invertible 1×1 conv → coupling.

    Args:
        channels: C.
        hidden_channels: width of the coupling's conditioner.
        coupling: ``"affine"`` (Glow's sigmoid scale) or ``"additive"``.
        lu: LU-parametrised 1×1 conv.

    Shapes: x (N, C, H, W) → y (N, C, H, W), logdet (N,).
    """

    def __init__(self, channels: int, hidden_channels: int = 512, coupling: str = "affine", lu: bool = True):
        if coupling == "affine":
            coupling_layer = AffineCoupling(channels, hidden_channels)
        elif coupling == "additive":
            coupling_layer = AdditiveCoupling(channels, hidden_channels)
        else:
            raise ValueError(f"coupling must be 'affine' or 'additive', got {coupling!r}")
        super().__init__(ActNorm(channels), InvConv1x1(channels, lu=lu), coupling_layer)
