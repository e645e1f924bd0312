"""Conditioner networks: map the pass-through part of a coupling's input to its ``h``.

Each ends in a zero-initialised layer, so a fresh coupling is the identity (Glow's initialisation) and
its scale starts at ``s(0)``.
"""
import torch.nn.functional as TF
from torch import nn

from .actnorm import ActNorm


class ConvActNorm(nn.Module):
    """conv (no bias) → ActNorm → ReLU, as in Glow's hidden layers.

    Once ActNorm is initialised (and always in evaluation), it is folded into the convolution:
    ``ActNorm(conv(x, W)) = conv(x, W·e^log_scale) + bias`` per output channel, so the hidden activations
    are written once, by the convolution, and the ReLU runs in place on them. Gradients reach ``W``,
    ``log_scale`` and ``bias`` through the folded weight. The first training batch runs unfolded, for
    ActNorm's data-dependent initialisation.

    Shapes: (N, in_channels, H, W) → (N, out_channels, H, W).
    """

    def __init__(self, in_channels, out_channels, kernel_size):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        nn.init.normal_(self.conv.weight, 0.0, 0.05)
        self.norm = ActNorm(out_channels)
        self.fold = True

    def forward(self, x):
        norm = self.norm
        if not self.fold or (self.training and not norm._initialized):
            return norm(self.conv(x))[0].relu()
        weight = self.conv.weight * norm.log_scale.exp().to(self.conv.weight.dtype).view(-1, 1, 1, 1)
        # the convolution's backward needs its input and weight, not its output: ReLU may overwrite it
        return TF.conv2d(x, weight, norm.bias, padding=self.conv.padding).relu_()


def zero_conv(in_channels, out_channels, kernel_size=3):
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class GlowConditioner(nn.Sequential):
    """conv3×3 → ActNorm → ReLU → conv1×1 → ActNorm → ReLU → zero-initialised conv3×3.

    Shapes: (N, in_channels, H, W) → (N, out_channels, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int = 512):
        super().__init__(
            ConvActNorm(in_channels, hidden_channels, 3),
            ConvActNorm(hidden_channels, hidden_channels, 1),
            zero_conv(hidden_channels, out_channels),
        )


class _ResidualBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x):
        return x + self.body(x)


class ResNetConditioner(nn.Sequential):
    """RealNVP's residual s/t network: conv3×3 → residual blocks → ReLU → zero-initialised conv3×3.

    Shapes: (N, in_channels, H, W) → (N, out_channels, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int = 64, blocks: int = 4):
        super().__init__(
            nn.Conv2d(in_channels, hidden_channels, 3, padding=1),
            *[_ResidualBlock(hidden_channels) for _ in range(blocks)],
            nn.ReLU(),
            zero_conv(hidden_channels, out_channels),
        )


class MLPConditioner(nn.Module):
    """A multilayer perceptron for vector data seen as (N, D, 1, 1) images.

    Shapes: (N, in_features, 1, 1) → (N, out_features, 1, 1).
    """

    def __init__(self, in_features: int, out_features: int, hidden: int = 64, depth: int = 2):
        super().__init__()
        layers, width = [], in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        last = nn.Linear(width, out_features)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(*layers, last)

    def forward(self, x):
        n, c, h, w = x.shape
        return self.net(x.reshape(n, c)).reshape(n, -1, h, w)
