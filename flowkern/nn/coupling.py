import torch
from torch import nn

from .. import functional
from .._validation import check_choice, check_count, check_layer_input, check_number
from ..backends import get_backend
from ..reference import MASKS, SCALES, conditioner_channels, coupling_condition
from .actnorm import ActNorm
from .conditioners import GlowConditioner, form_input
from .glow_coupling import GlowCoupling, conditioner_activations, conditioner_weights


class AffineCoupling(nn.Module):
    """Affine coupling: the transformed part becomes ``x · s + shift`` with ``(raw, shift) = net(pass)``.

    Args:
        channels: C, the input's channel count.
        hidden_channels: width of the default Glow conditioner.
        mask: ``"channel"`` (halves of the channels; uneven for odd C) or ``"checkerboard"``.
        parity: 0 or 1, which half or which squares are transformed (see :mod:`flowkern.reference`).
        scale: ``"sigmoid"`` (Glow, ``s = sigmoid(raw + 2)``) or ``"exp"`` (RealNVP,
            ``s = exp(bound · tanh(raw))``); ``"additive"`` makes ``s = 1``; the others of
            :data:`flowkern.reference.SCALES` (the peers' conventions) are accepted too.
        bound: the ``"exp"`` and ``"atan"`` scales' bound on ``|log s|``.
        conditioner: a module mapping (N, C_in, H, W) to (N, C_out, H, W), or a factory
            ``conditioner(C_in, C_out) -> nn.Module``; by default a :class:`GlowConditioner`.
            ``(C_in, C_out)`` is :attr:`conditioner_channels`.

    Shapes: x (N, C, H, W) → y (N, C, H, W), logdet (N,).
    """

    def __init__(self, channels, hidden_channels=512, mask="channel", parity=0, scale="sigmoid",
                 bound=2.0, conditioner=None):
        super().__init__()
        check_choice(mask, MASKS, "mask")
        check_choice(parity, (0, 1), "parity")
        check_choice(scale, SCALES, "scale")
        check_count(channels, "channels")
        check_count(hidden_channels, "hidden_channels")
        bound = check_number(bound, "bound", above=0)
        if mask == "channel" and channels < 2:
            raise ValueError(f"a channel-mask coupling needs at least 2 channels, got {channels}")
        self.channels, self.mask, self.parity, self.scale, self.bound = channels, mask, parity, scale, bound
        self.conditioner_channels = conditioner_channels(channels, mask, parity, scale)
        if conditioner is None:
            conditioner = GlowConditioner(*self.conditioner_channels, hidden_channels)
        elif not isinstance(conditioner, nn.Module):
            conditioner = conditioner(*self.conditioner_channels)
        self.conditioner = conditioner

    def _conditioner_output(self, x, name):
        check_layer_input(self, x, name)
        return self.conditioner(coupling_condition(x, self.mask, self.parity))

    layout = "halves"  # h = (raw, shift): the conditioner's output as the coupling op reads it

    def _options(self):
        return dict(mask=self.mask, parity=self.parity, scale=self.scale, bound=self.bound, layout=self.layout)

    def _one_node_form(self, x):
        """The conditioner's form where this call runs as one :class:`~flowkern.nn.glow_coupling.GlowCoupling`
        node (a default conditioner that folds, a gradient to record and a fused backend: the reference backend
        keeps the composition of plain ops, the node's specification), else None."""
        if (isinstance(self.conditioner, GlowConditioner) and torch.is_grad_enabled()
                and get_backend() != "reference"):
            return self.conditioner.one_node_form(x)
        return None

    def forward(self, x):
        form = self._one_node_form(x)
        if form is not None:
            check_layer_input(self, x, "x")
            return GlowCoupling.apply(x, *conditioner_weights(self.conditioner), self, None, form)
        return functional.coupling_forward(x, self._conditioner_output(x, "x"), **self._options())

    def inverse(self, y):
        # The pass-through part of y equals that of x, so the conditioner sees the same input.
        self._check_initialized(y)
        return functional.coupling_inverse(y, self._conditioner_output(y, "y"), **self._options())[0]

    def _check_initialized(self, y):
        """Refuse to invert in training mode while the conditioner's ActNorms wait for their data-dependent
        initialisation: inverting would initialise them from latents (``sample`` runs in evaluation mode)."""
        if len(y) and any(m.will_initialize() for m in self.conditioner.modules() if isinstance(m, ActNorm)):
            raise RuntimeError(f"{type(self).__name__}.inverse: the conditioner's ActNorm is not initialised "
                               "yet; run a forward pass on data first (the first one in training mode initialises "
                               "it), load a trained state_dict, or call .eval()")

    def rebuild(self, y):
        """For training by inversion: ``(x, leaf, y_again, logdet)`` with ``x`` the input rebuilt from ``y``
        and ``y_again, logdet`` recomputed under autograd as functions of ``leaf``, a stand-in for ``x``.

        The conditioner runs once: its input, the pass-through part, is the same in ``y`` and ``x``, so it
        is computed from ``leaf`` (``y`` as a new leaf of the graph, sharing its memory), and ``leaf + (x − y)``
        carries ``x``'s values with an identity Jacobian into the transform.
        """
        form = self._one_node_form(y)
        if form is not None:  # the conditioner runs once, to invert; the node then reuses its activations
            check_layer_input(self, y, "y")
            weights = conditioner_weights(self.conditioner)
            with torch.no_grad():
                condition = form_input(coupling_condition(y, self.mask, self.parity), form)
                activations = conditioner_activations(condition, weights, self.conditioner.paddings())
                x = functional.coupling_inverse(y, activations[2], **self._options())[0]
            leaf = x.detach().requires_grad_()
            return (x, leaf, *GlowCoupling.apply(leaf, *weights, self, activations, form))
        leaf = y.detach().requires_grad_()
        h = self._conditioner_output(leaf, "y")
        with torch.no_grad():
            x = functional.coupling_inverse(y, h, **self._options())[0]
        y_again, logdet = functional.coupling_forward(leaf + (x - y).detach(), h, **self._options())
        return x, leaf, y_again, logdet

    def extra_repr(self):
        return f"{self.channels}, mask={self.mask!r}, parity={self.parity}, scale={self.scale!r}"


class AdditiveCoupling(AffineCoupling):
    """Additive coupling (NICE, Glow's volume-preserving variant): ``y = x + shift`` on the transformed part.

    Shapes: x (N, C, H, W) → y (N, C, H, W), logdet (N,) of zeros.
    """

    def __init__(self, channels, hidden_channels=512, mask="channel", parity=0, conditioner=None):
        super().__init__(channels, hidden_channels, mask, parity, "additive", conditioner=conditioner)
