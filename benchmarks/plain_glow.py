"""Glow in plain PyTorch, written the way the popular single-file implementations write it: the baseline
that flowkern's whole-model benchmarks are measured against.

ActNorm is its own pass and checks its initialisation flag on every call, the LU weight is assembled
with matrix products on every call, the conditioner is conv3×3 → ActNorm → ReLU → conv1×1 → ActNorm →
ReLU → zero conv3×3, the coupling scale is ``sigmoid(raw + 2)``, and each split factors half the
channels out under a learned conditional Gaussian prior. The architecture, the parametrisation and the
module names are those of :class:`flowkern.Glow`, so ``PlainGlow(...).load_state_dict(glow.state_dict())``
gives the same density (a test checks it): the comparison is like for like.

Shapes: x (N, C, H, W) → (zs, a list of per-level latents, logdet (N,)).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


class ActNorm(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def initialize(self, x):
        mean = x.mean(dim=(0, 2, 3))
        std = x.std(dim=(0, 2, 3), unbiased=False)
        self.log_scale.copy_(-torch.log(std + 1e-6))
        self.bias.copy_(-mean / (std + 1e-6))
        self.initialized.fill_(True)

    def forward(self, x):
        if not self.initialized:
            self.initialize(x)
        y = x * torch.exp(self.log_scale).view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return y, x.shape[2] * x.shape[3] * self.log_scale.sum()

    def reverse(self, y):
        return (y - self.bias.view(1, -1, 1, 1)) * torch.exp(-self.log_scale).view(1, -1, 1, 1)


class InvConv1x1LU(nn.Module):
    def __init__(self, channels):
        super().__init__()
        q = torch.linalg.qr(torch.randn(channels, channels, dtype=torch.float64))[0]
        perm, lower, upper = torch.linalg.lu(q)
        diag = torch.diagonal(upper)
        self.register_buffer("perm", perm.float())
        self.register_buffer("sign", torch.sign(diag).float())
        self.lower = nn.Parameter(torch.tril(lower, -1).float())
        self.upper = nn.Parameter(torch.triu(upper, 1).float())
        self.log_s = nn.Parameter(torch.log(diag.abs()).float())

    def weight(self):
        c = self.log_s.shape[0]
        eye = torch.eye(c, device=self.log_s.device)
        lower = self.lower * torch.tril(torch.ones_like(eye), -1) + eye
        upper = self.upper * torch.triu(torch.ones_like(eye), 1) + torch.diag(self.sign * torch.exp(self.log_s))
        return self.perm @ lower @ upper

    def forward(self, x):
        y = F.conv2d(x, self.weight()[:, :, None, None])
        return y, x.shape[2] * x.shape[3] * self.log_s.sum()

    def reverse(self, y):
        return F.conv2d(y, torch.inverse(self.weight())[:, :, None, None])


class ConvActNorm(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.conv.weight.data.normal_(0, 0.05)
        self.norm = ActNorm(out_channels)

    def forward(self, x):
        return F.relu(self.norm(self.conv(x))[0])


def zero_conv(in_channels, out_channels):
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
    conv.weight.data.zero_()
    conv.bias.data.zero_()
    return conv


class AffineCoupling(nn.Module):
    def __init__(self, channels, hidden):
        super().__init__()
        kept = (channels + 1) // 2
        self.conditioner = nn.Sequential(ConvActNorm(kept, hidden, 3), ConvActNorm(hidden, hidden, 1),
                                         zero_conv(hidden, 2 * (channels - kept)))

    def forward(self, x):
        x_a, x_b = x.chunk(2, 1)
        raw, shift = self.conditioner(x_a).chunk(2, 1)
        log_s = F.logsigmoid(raw + 2)
        y_b = x_b * torch.exp(log_s) + shift
        return torch.cat([x_a, y_b], 1), log_s.flatten(1).sum(1)

    def reverse(self, y):
        y_a, y_b = y.chunk(2, 1)
        raw, shift = self.conditioner(y_a).chunk(2, 1)
        return torch.cat([y_a, (y_b - shift) / torch.sigmoid(raw + 2)], 1)


class FlowStep(nn.Sequential):
    def __init__(self, channels, hidden):
        super().__init__(ActNorm(channels), InvConv1x1LU(channels), AffineCoupling(channels, hidden))

    def forward(self, x):
        logdet = 0
        for layer in self:
            x, layer_logdet = layer(x)
            logdet = logdet + layer_logdet
        return x, logdet

    def reverse(self, y):
        for layer in reversed(self):
            y = layer.reverse(y)
        return y


class Squeeze(nn.Module):
    def forward(self, x):
        n, c, h, w = x.shape
        x = x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
        return x.reshape(n, c * 4, h // 2, w // 2), 0

    def reverse(self, y):
        n, c, h, w = y.shape
        y = y.view(n, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
        return y.reshape(n, c // 4, h * 2, w * 2)


def gaussian_log_p(x, mean, log_sd):
    return -0.5 * math.log(2 * math.pi) - log_sd - 0.5 * (x - mean) ** 2 / torch.exp(2 * log_sd)


class Split(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.prior = zero_conv((channels + 1) // 2, 2 * (channels // 2))


class Gaussianize(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.mean = nn.Parameter(torch.zeros(channels, 1, 1))
        self.log_std = nn.Parameter(torch.zeros(channels, 1, 1))


class Level(nn.Module):
    def __init__(self, flow, exit):
        super().__init__()
        self.flow, self.exit = flow, exit


class PlainGlow(nn.Module):
    def __init__(self, in_channels=3, image_size=32, levels=3, steps=32, hidden_channels=512):
        super().__init__()
        blocks, channels, size = [], in_channels, image_size
        for level in range(levels):
            channels, size = channels * 4, size // 2
            flow = nn.Sequential(Squeeze(), *[FlowStep(channels, hidden_channels) for _ in range(steps)])
            last = level == levels - 1
            blocks.append(Level(flow, Gaussianize(channels) if last else Split(channels)))
            channels = channels if last else (channels + 1) // 2
        self.levels = nn.ModuleList(blocks)
        self.top_shape = (channels, size, size)

    def forward(self, x):
        """(log p(x) per sample, the latents): the latents are the factored-out z2's and the top z."""
        log_p, zs = 0, []
        for level in self.levels:
            for layer in level.flow:
                x, logdet = layer(x)
                log_p = log_p + logdet
            if isinstance(level.exit, Split):
                x, z = x.chunk(2, 1)
                mean, log_sd = level.exit.prior(x).chunk(2, 1)
            else:
                z, mean, log_sd = x, level.exit.mean, level.exit.log_std
            log_p = log_p + gaussian_log_p(z, mean, log_sd).flatten(1).sum(1)
            zs.append(z)
        return log_p, zs

    def log_prob(self, x):
        return self(x)[0]

    def bits_per_dim(self, x, n_bins=256):
        dims = x[0].numel()
        return (-self.log_prob(x) + dims * math.log(n_bins)) / (dims * math.log(2))

    def reverse(self, zs=None, n=None, temperature=1.0):
        """x from the latents that forward returns, or without them from ``n`` drawn at ``temperature``."""
        x = None
        for i in reversed(range(len(self.levels))):
            level = self.levels[i]
            if x is None:  # the top level's learned prior
                mean, log_sd = level.exit.mean.expand(n or len(zs[i]), *self.top_shape), level.exit.log_std
            else:
                mean, log_sd = level.exit.prior(x).chunk(2, 1)
            z = zs[i] if zs is not None else mean + torch.exp(log_sd) * temperature * torch.randn_like(mean)
            x = z if x is None else torch.cat([x, z], 1)
            for layer in reversed(level.flow):
                x = layer.reverse(x)
        return x

    @torch.no_grad()
    def sample(self, n, temperature=1.0):
        return self.reverse(n=n, temperature=temperature)
