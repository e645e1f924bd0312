from collections.abc import Iterator

import torch
from torch import nn

from .. import functional
from .._validation import check_actnorm, check_layer_input
from ..reference._dtypes import compute_dtype, full_precision
from .actnorm import ActNorm
from .coupling import AdditiveCoupling, AffineCoupling
from .invconv import InvConv1x1
from .memory_saving import Unit, chain_by_inversion


class FlowSequential(nn.Sequential):
    """A chain of flow layers: log-dets add up, ``inverse`` runs the layers backwards.

    Args:
        *layers: flow layers (``y, logdet = layer(x)``, ``x = layer.inverse(y)``).
        memory_saving: when gradients are needed, keep only the chain's output and rebuild each layer's
            input by inversion in the backward pass (:mod:`flowkern.nn.memory_saving`): activation memory
            of one layer instead of all. Not traceable by ``torch.compile``; the layers must not draw
            random numbers in their forward.
        check_reconstruction: with ``memory_saving``, also keep the chain's input (that of its first layer
            which needs a gradient) and warn (``ReconstructionWarning``) when the one the backward pass
            rebuilds differs from it by more than this relative error; the last error is in
            ``last_reconstruction_error``.

    Shapes: those of its layers; logdet (N,).
    """

    def __init__(self, *layers, memory_saving: bool = False, check_reconstruction: float | None = None):
        for layer in layers:
            if not callable(getattr(layer, "inverse", None)):
                raise TypeError(f"{type(self).__name__} takes flow layers (y, logdet = layer(x) and "
                                f"x = layer.inverse(y)); {type(layer).__name__} has no inverse")
        super().__init__(*layers)
        self.memory_saving = memory_saving
        self.check_reconstruction = check_reconstruction
        self.last_reconstruction_error = None

    def units(self) -> Iterator[Unit]:
        """The layers, nested chains (such as :class:`FlowStep`) expanded: what the backward pass of
        training by inversion rebuilds one at a time."""
        for layer in self:
            if isinstance(layer, FlowSequential):
                yield from layer.units()
            else:
                yield layer

    def run(self, x):
        logdet = 0
        for layer in self:
            x, layer_logdet = layer(x)
            logdet = logdet + layer_logdet
        return x, logdet

    def forward(self, x):
        if self.memory_saving and torch.is_grad_enabled() and len(self) > 0 and (
                x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return chain_by_inversion(self, x)
        return self.run(x)

    def inverse(self, y):
        for layer in reversed(self):
            y = layer.inverse(y)
        return y


class FlowStep(FlowSequential):
    """One step of Glow: ActNorm → invertible 1×1 conv → coupling.

    Once ActNorm is initialised, ActNorm and the 1×1 conv run as one per-pixel map with the weight
    ``W·diag(e^log_scale)`` and bias ``W·bias`` (``fold_actnorm=True``): one pass over the activations
    instead of two, and one activation fewer kept for the backward.

    Args:
        channels: C.
        hidden_channels: width of the coupling's conditioner.
        coupling: ``"affine"`` (Glow's sigmoid scale) or ``"additive"``.
        lu: LU-parametrised 1×1 conv.
        fold_actnorm: fold ActNorm into the 1×1 conv (the same map, computed in one pass).

    Shapes: x (N, C, H, W) → y (N, C, H, W), logdet (N,).
    """

    def __init__(self, channels: int, hidden_channels: int = 512, coupling: str = "affine", lu: bool = True,
                 fold_actnorm: bool = True):
        if coupling == "affine":
            coupling_layer = AffineCoupling(channels, hidden_channels)
        elif coupling == "additive":
            coupling_layer = AdditiveCoupling(channels, hidden_channels)
        else:
            raise ValueError(f"coupling must be 'affine' or 'additive', got {coupling!r}")
        # a sequence, so that its state_dict keys are 0., 1., 2.; the layers are named below
        super().__init__(ActNorm(channels), InvConv1x1(channels, lu=lu), coupling_layer)
        self.fold_actnorm = fold_actnorm
        self.actnorm_conv1x1 = ActNormConv1x1(self.actnorm, self.invconv)  # a plain attribute: not a submodule

    @property
    def actnorm(self) -> ActNorm:
        return self[0]

    @property
    def invconv(self) -> InvConv1x1:
        return self[1]

    @property
    def coupling(self) -> AffineCoupling:
        return self[2]

    def folds(self):
        """Whether ActNorm is folded into the 1×1 conv on this call (not on the first training batch: ActNorm's
        data-dependent initialisation needs its own forward)."""
        return self.fold_actnorm and not self.actnorm.will_initialize()

    def units(self) -> Iterator[Unit]:
        if self.folds():
            yield self.actnorm_conv1x1
            yield self.coupling
        else:
            yield from super().units()

    def forward(self, x):
        if not self.folds():
            return self.run(x)
        y, logdet = self.actnorm_conv1x1(x)
        y, coupling_logdet = self.coupling(y)
        return y, logdet + coupling_logdet

    def inverse(self, y):
        if not self.fold_actnorm:
            return super().inverse(y)
        return self.actnorm_conv1x1.inverse(self.coupling.inverse(y))


class ActNormConv1x1:
    """An :class:`ActNorm` and the :class:`InvConv1x1` after it as one layer: the per-pixel map
    ``W·(x·e^log_scale + bias)`` computed in one pass, with the log-dets of both. A view of the two
    modules, built once by a :class:`FlowStep`; it owns no parameters (they stay the two modules', and so
    in the step's ``state_dict``), so it is a :class:`~flowkern.nn.memory_saving.Unit`, not an
    ``nn.Module``: how a folding step runs them, and the unit in which training by inversion rebuilds them.

    Shapes: x (N, C, H, W) → y (N, C, H, W), logdet (N,).
    """

    def __init__(self, actnorm: ActNorm, conv: InvConv1x1):
        self.actnorm, self.conv = actnorm, conv

    def parameters(self):
        yield from self.actnorm.parameters()
        yield from self.conv.parameters()

    @full_precision
    def folded(self):
        """``(weight (C, C), bias (C,), log-det per pixel (0-d))`` of the per-pixel map: with the LU weight, one
        fused op (:func:`flowkern.functional.folded_lu_weight`)."""
        actnorm, conv = self.actnorm, self.conv
        if conv.lu:
            return functional.folded_lu_weight(conv.perm, conv.lower, conv.upper, conv.sign, conv.log_s,
                                               actnorm.log_scale, actnorm.bias)
        weight, ct = conv.weight, compute_dtype(conv.weight.dtype)
        per_pixel = torch.linalg.slogdet(weight.double())[1].to(ct) + actnorm.log_scale.to(ct).sum()
        return weight * actnorm.log_scale.exp(), weight @ actnorm.bias, per_pixel

    def __call__(self, x):
        check_layer_input(self.conv, x, "x")
        check_actnorm(x, self.actnorm.log_scale, self.actnorm.bias)
        weight, bias, per_pixel = self.folded()
        logdet = (per_pixel.to(compute_dtype(x.dtype)) * (x.shape[2] * x.shape[3])).expand(x.shape[0])
        return functional.conv1x1(x, weight, bias), logdet

    def inverse(self, y):
        check_layer_input(self.conv, y, "y")
        actnorm, conv = self.actnorm, self.conv
        if not conv.lu:
            return functional.actnorm_conv1x1_inverse(y, actnorm.log_scale, actnorm.bias, conv.inverse_weight_matrix())
        weight, bias = functional.folded_lu_weight_inverse(conv.perm, conv.lower, conv.upper, conv.sign, conv.log_s,
                                                           actnorm.log_scale, actnorm.bias)
        return functional.conv1x1(y, weight, bias)
