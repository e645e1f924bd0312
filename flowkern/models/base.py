import math

import torch
from torch import nn

from ..reference import standard_normal_log_prob
from .._validation import check_count, check_image, check_module_input, check_temperature


class FlowModel(nn.Module):
    """A normalizing flow with a standard normal prior over every latent it returns.

    Subclasses define ``forward(x) -> (zs, logdet)``, ``inverse(zs) -> x`` and :meth:`latent_shapes`.
    ``zs`` is a list of per-level latents for multi-scale models and one tensor otherwise.
    """

    multi_scale = True
    #: whether a training step of the model reads values back to the host anyway (an adaptive ODE solve reads
    #: its error estimate at every solver step), and its backward cannot take a non-finite loss (an adjoint
    #: solve would fail): the training loop then checks the loss before the backward
    checks_loss_before_backward = False
    #: the divergence the last evaluation used (``"exact"`` or ``"hutchinson"``), for models that solve an ODE
    last_divergence = None

    @property
    def evaluations(self):
        """Network evaluations of a solver since the model was built (None: the model solves nothing)."""
        return None

    def latent_shapes(self) -> list:
        """Per-sample shapes of the latents that :meth:`sample` draws, in the order of ``zs``."""
        raise NotImplementedError

    def chains(self) -> list:
        """The model's chains of flow layers (one per level), each a :class:`~flowkern.nn.FlowSequential`."""
        raise NotImplementedError

    def set_memory_saving(self, enabled: bool = True, check_reconstruction: float | None = None):
        """Train by inversion: each chain keeps only its output and rebuilds its layers' inputs in the
        backward pass (see :class:`~flowkern.nn.FlowSequential`). Returns the model."""
        for chain in self.chains():
            chain.memory_saving = enabled
            chain.check_reconstruction = check_reconstruction
        return self

    def regularization(self):
        """A term the training loss adds, from the last training forward (0 for flows without one)."""
        return 0.0

    def _latents(self, zs):
        return list(zs) if self.multi_scale else [zs]

    def log_prob(self, x):
        """Per-sample log density of ``x`` in nats, prior included: shape (N,)."""
        zs, logdet = self(x)
        return logdet + sum(standard_normal_log_prob(z) for z in self._latents(zs))

    def bits_per_dim(self, x, n_bins="auto"):
        """Per-sample negative log-likelihood in bits per dimension, shape (N,).

        ``x`` is data dequantised onto a unit-width range (``flowkern.data.dequantize``); ``n_bins`` is the
        number of levels it was quantised to (2**n_bits; 17 for digits), whose ``D · log(n_bins)`` term turns
        the density into the probability of the discrete data. ``n_bins=None`` gives the continuous value;
        ``"auto"`` is 256 (8-bit data) for images (N, C, H, W) and None for vectors (N, D).
        """
        if isinstance(n_bins, str) and n_bins == "auto":
            n_bins = 256 if x.dim() == 4 else None
        if n_bins is not None:
            check_count(n_bins, "n_bins")
        dims = math.prod(x.shape[1:])
        nll = -self.log_prob(x)
        if n_bins is not None:
            nll = nll + dims * math.log(n_bins)
        return nll / (dims * math.log(2))

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, generator=None):
        """Draw ``n`` samples with every latent ~ N(0, temperature²). Sampling changes nothing in the model:
        it runs in evaluation mode, so an ActNorm not yet initialised stays so (and acts as the identity)."""
        check_count(n, "n", minimum=0)
        temperature = check_temperature(temperature)
        param = next(self.parameters())
        zs = [torch.normal(0.0, temperature, (n, *shape), generator=generator, device=param.device, dtype=param.dtype)
              for shape in self.latent_shapes()]
        training = self.training
        try:
            return self.eval().inverse(zs if self.multi_scale else zs[0])
        finally:
            self.train(training)


class _Level(nn.Module):
    """One scale of a multi-scale flow: its layers, then what leaves the flow there."""

    def __init__(self, flow, exit=None):
        super().__init__()
        self.flow = flow
        self.exit = exit


class MultiScaleFlow(FlowModel):
    """Levels of flow layers; each level but the last ends in a :class:`~flowkern.nn.Split`.

    ``forward`` returns one latent per level: the split-off ``eps`` of each level, then the output of
    the last level (after its optional :class:`~flowkern.nn.Gaussianize`).
    """

    def __init__(self, in_channels, image_size, levels, latent_shapes):
        super().__init__()
        self.in_channels = in_channels
        self.image_size = image_size
        self.levels = nn.ModuleList(levels)
        self._latent_shapes = latent_shapes

    def latent_shapes(self):
        return list(self._latent_shapes)

    def chains(self):
        return [level.flow for level in self.levels]

    def forward(self, x):
        check_image(x, "x", self.in_channels)
        check_module_input(self, x)
        if x.shape[2:] != (self.image_size, self.image_size):  # its samples and priors have that size
            raise ValueError(f"{type(self).__name__}(image_size={self.image_size}) takes images of "
                             f"{self.image_size}×{self.image_size}, got shape {tuple(x.shape)}")
        zs, logdet = [], 0
        last = len(self.levels) - 1
        for i, level in enumerate(self.levels):
            x, level_logdet = level.flow(x)
            logdet = logdet + level_logdet
            if level.exit is not None:
                x, exit_logdet = level.exit(x)
                logdet = logdet + exit_logdet
                if i < last:
                    x, eps = x
                    zs.append(eps)
        zs.append(x)
        return zs, logdet

    def inverse(self, zs):
        if not isinstance(zs, (list, tuple)) or len(zs) != len(self.levels):
            raise ValueError(f"{type(self).__name__}.inverse expects the list of {len(self.levels)} latents "
                             f"that forward returns")
        x = zs[-1]
        last = len(self.levels) - 1
        for i in range(last, -1, -1):
            level = self.levels[i]
            if level.exit is not None:
                x = level.exit.inverse(x if i == last else (x, zs[i]))
            x = level.flow.inverse(x)
        return x
