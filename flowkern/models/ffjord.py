import math

import torch

from .._validation import check_count, check_module_input, check_number, check_tensor
from ..nn.continuous import ConcatSquashConvNet, ConcatSquashMLP, ContinuousFlow
from .base import FlowModel

EXACT_LIMIT = 64  # dimensions up to which evaluation takes the exact trace (one VJP per dimension)


class FFJORD(FlowModel):
    """FFJORD (Grathwohl et al. 2019): a continuous normalizing flow, one ODE ``dz/dt = f(t, z)`` solved by
    torchdiffeq, with free-form dynamics: a concat-squash MLP for vectors, a concat-squash convolutional
    network for images (:mod:`flowkern.nn.continuous`).

    ``zs, logdet = model(x)``: z = z(T) and the change in log-density ``logdet = ∫ tr(∂f/∂z) dt``. In training
    the trace is ``divergence`` (Hutchinson's estimate by default above :data:`EXACT_LIMIT` dimensions); in
    evaluation, :meth:`log_prob` takes the exact trace up to :data:`EXACT_LIMIT` dimensions and records which
    it used in :attr:`last_divergence`.

    Args:
        shape: the shape of one sample: ``(D,)`` (or ``D``) for vectors, ``(C, H, W)`` for images.
        hidden, depth: width and number of hidden layers of the dynamics.
        time: the end time T.
        method, rtol, atol: torchdiffeq's solver and its tolerances.
        adjoint: train with the adjoint method (memory constant in the solver's steps).
        divergence: ``"exact"`` or ``"hutchinson"`` in training (default: exact up to :data:`EXACT_LIMIT`
            dimensions).
        noise: Hutchinson's noise, ``"rademacher"`` or ``"gaussian"``.
        kinetic, jacobian: weights of the kinetic-energy and Jacobian-norm regularisers in
            :meth:`regularization` (Finlay et al. 2020).

    Shapes: x (N, *shape) → z (N, *shape), logdet (N,).
    """

    multi_scale = False
    checks_loss_before_backward = True  # the adjoint solve cannot take a NaN; the adaptive solve syncs anyway

    def __init__(self, shape=(2,), hidden=64, depth=3, time=1.0, method="dopri5", rtol=1e-5, atol=1e-5,
                 adjoint=True, divergence=None, noise="rademacher", kinetic=0.0, jacobian=0.0):
        super().__init__()
        if not isinstance(shape, (tuple, list, torch.Size)):
            check_count(shape, "shape (an int D, or (D,) or (C, H, W))")
            shape = (shape,)
        shape = tuple(shape)
        if len(shape) not in (1, 3):
            raise ValueError(f"shape must be (D,) or (C, H, W), got {shape}")
        for value in shape:
            check_count(value, "each size in shape")
        check_count(hidden, "hidden")
        check_count(depth, "depth")
        kinetic, jacobian = check_number(kinetic, "kinetic", minimum=0), check_number(jacobian, "jacobian", minimum=0)
        self.shape = shape
        self.dims = math.prod(shape)
        divergence = divergence or ("exact" if self.dims <= EXACT_LIMIT else "hutchinson")
        dynamics = ConcatSquashMLP if len(shape) == 1 else ConcatSquashConvNet
        net = dynamics(shape[0], hidden, depth)
        self.kinetic_weight, self.jacobian_weight = kinetic, jacobian
        self.flow = ContinuousFlow(net, time=time, method=method, rtol=rtol, atol=atol, adjoint=adjoint,
                                   divergence=divergence, noise=noise, regularize=kinetic > 0 or jacobian > 0)
        self.last_divergence = None

    def latent_shapes(self):
        return [self.shape]

    def chains(self):
        return []

    def set_memory_saving(self, enabled=True, check_reconstruction=None):
        if enabled:
            raise ValueError("FFJORD has no layers to rebuild by inversion; its adjoint training (adjoint=True) "
                             "already keeps memory constant in the solver's steps")
        return self

    def _check(self, x, name):
        check_tensor(x, name, ndim=1 + len(self.shape))
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"{name} must have shape (N, {', '.join(map(str, self.shape))}), got {tuple(x.shape)}")
        check_module_input(self, x, name)

    def forward(self, x):
        self._check(x, "x")
        divergence = self.flow.divergence if self.training or self.dims > EXACT_LIMIT else "exact"
        self.last_divergence = divergence
        return self.flow(x, divergence)

    def inverse(self, z):
        self._check(z, "z")
        return self.flow.inverse(z)

    @property
    def nfe(self):
        """Network evaluations of the last solve (forward, inverse, or the adjoint solve of a backward)."""
        return self.flow.nfe

    @property
    def evaluations(self):
        """Network evaluations since the model was built; the difference across a backward is its NFE."""
        return self.flow.dynamics.calls

    def regularization(self):
        """The weighted regularisers of the last training forward, averaged over its samples (0 without)."""
        if self.flow.kinetic is None:
            return 0.0
        return (self.kinetic_weight * self.flow.kinetic.mean() + self.jacobian_weight * self.flow.jacobian.mean())
