import torch
from torch import nn

from ..reference import standardize, unstandardize
from .._validation import check_image, check_module_input
from .conditioners import zero_conv


class Split(nn.Module):
    """Multi-scale split: half the channels leave the flow, standardised under a learned prior.

    ``z1, z2 = x.chunk(2, dim=1)``; ``z1`` goes on through the flow, and ``z2`` is factored out with the
    conditional Gaussian prior ``N(mean(z1), exp(log_std(z1))²)`` of Glow (a zero-initialised conv3×3 of
    ``z1``), written as the bijection ``eps = (z2 − mean) · exp(−log_std)`` with log-det ``−Σ log_std``.
    ``eps`` is then standard normal under the model. ``learn_prior=False`` gives RealNVP's fixed
    N(0, I) prior (``eps = z2``).

    Shapes: x (N, C, H, W) → ((z1 (N, ⌈C/2⌉, H, W), eps (N, ⌊C/2⌋, H, W)), logdet (N,)).
    ``inverse`` takes the pair ``(z1, eps)``.
    """

    def __init__(self, channels: int, learn_prior: bool = True):
        super().__init__()
        if channels < 2:
            raise ValueError(f"Split needs at least 2 channels, got {channels}")
        self.channels = channels
        self.kept = (channels + 1) // 2
        self.prior = zero_conv(self.kept, 2 * (channels - self.kept)) if learn_prior else None

    def _mean_log_std(self, z1):
        if self.prior is None:
            zero = z1.new_zeros(())
            return zero, zero
        return self.prior(z1).chunk(2, dim=1)

    def forward(self, x):
        check_image(x, "x", self.channels)
        check_module_input(self, x)
        z1, z2 = x.chunk(2, dim=1)
        eps, logdet = standardize(z2, *self._mean_log_std(z1))
        return (z1, eps), logdet

    def inverse(self, y):
        z1, eps = y
        check_image(z1, "z1", self.kept)
        check_image(eps, "eps", self.channels - self.kept)
        check_module_input(self, z1, "z1")
        if eps.shape[0] != z1.shape[0] or eps.shape[2:] != z1.shape[2:]:
            raise ValueError(f"z1 and eps must share N, H, W, got {tuple(z1.shape)} and {tuple(eps.shape)}")
        z2 = unstandardize(eps, *self._mean_log_std(z1))
        return torch.cat([z1, z2], dim=1)

    def extra_repr(self):
        return f"{self.channels}, learn_prior={self.prior is not None}"


class Gaussianize(nn.Module):
    """A learned per-channel Gaussian prior over the last latent, as the bijection of :class:`Split`.

    Shapes: x (N, C, H, W) → eps (N, C, H, W), logdet (N,) = −H · W · Σ log_std.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.mean = nn.Parameter(torch.zeros(channels, 1, 1))
        self.log_std = nn.Parameter(torch.zeros(channels, 1, 1))

    def forward(self, x):
        check_image(x, "x", self.channels)
        check_module_input(self, x)
        return standardize(x, self.mean, self.log_std)

    def inverse(self, y):
        check_image(y, "y", self.channels)
        check_module_input(self, y, "y")
        return unstandardize(y, self.mean, self.log_std)

    def extra_repr(self):
        return f"{self.channels}"
