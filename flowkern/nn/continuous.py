"""Continuous-time flows (FFJORD, Grathwohl et al. 2019): one ODE ``dz/dt = f(t, z)`` with shared parameters
instead of a stack of layers, solved by torchdiffeq.

The map x = z(0) ↦ z = z(T) has log-determinant ``∫₀ᵀ tr(∂f/∂z) dt`` (the instantaneous change of variables),
integrated beside z. The trace is exact (one vector-Jacobian product per dimension) or Hutchinson's estimate
``εᵀ (∂f/∂z) ε`` with one noise ε ~ Rademacher or N(0, I) drawn per solve. Optional regularisers from "How to
train your neural ODE" (Finlay et al. 2020) are integrated beside them: the kinetic energy ``∫ ‖f‖² dt`` and
the Jacobian's Frobenius norm ``∫ ‖εᵀ ∂f/∂z‖² dt``; both keep the number of function evaluations low.
"""
import torch
from torch import nn
from torch.nn import functional as F

from .._validation import check_choice, check_flag, check_number

DIVERGENCES = ("exact", "hutchinson")
NOISES = ("rademacher", "gaussian")
# torchdiffeq's solvers that take only tolerances (its "scipy_solver" needs options of its own)
SOLVERS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun", "euler", "midpoint", "heun2", "heun3",
           "rk4", "explicit_adams", "implicit_adams", "fixed_adams")


def exact_divergence(dz: torch.Tensor, z: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """tr(∂dz/∂z) per sample, one vector-Jacobian product per dimension: dz, z (N, ...) → (N,)."""
    flat = dz.flatten(1)
    div = torch.zeros(flat.shape[0], dtype=dz.dtype, device=dz.device)
    for i in range(flat.shape[1]):
        row = torch.autograd.grad(flat[:, i].sum(), z, create_graph=create_graph, retain_graph=True)[0]
        div = div + row.flatten(1)[:, i]
    return div


def hutchinson_divergence(dz: torch.Tensor, z: torch.Tensor, noise: torch.Tensor, create_graph: bool = False):
    """Hutchinson's estimate ``εᵀ (∂dz/∂z) ε`` per sample and ``εᵀ ∂dz/∂z``: dz, z, noise (N, ...) →
    ((N,), (N, ...)). Unbiased for noise of zero mean and identity covariance."""
    noise_jacobian = torch.autograd.grad(dz, z, noise, create_graph=create_graph)[0]
    return (noise_jacobian * noise).flatten(1).sum(1), noise_jacobian


def draw_noise(like: torch.Tensor, kind: str, generator=None) -> torch.Tensor:
    """Noise of ``like``'s shape with zero mean and identity covariance: Rademacher (±1) or Gaussian."""
    if kind == "rademacher":
        bits = torch.randint(0, 2, like.shape, generator=generator, device=like.device)
        return (2 * bits - 1).to(like.dtype)
    return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)


class ConcatSquashLinear(nn.Module):
    """``(W z + b) · σ(g t + c) + h t``: a linear layer gated and shifted by time. t scalar, z (N, in) → (N, out)."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.gate = nn.Linear(1, out_features)
        self.shift = nn.Linear(1, out_features, bias=False)

    def forward(self, t, z):
        t = t.reshape(1, 1).to(z)
        return self.linear(z) * torch.sigmoid(self.gate(t)) + self.shift(t)


class ConcatSquashConv2d(nn.Module):
    """The same gate and shift around a 3×3 convolution: t scalar, z (N, C_in, H, W) → (N, C_out, H, W)."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.gate = nn.Linear(1, out_channels)
        self.shift = nn.Linear(1, out_channels, bias=False)

    def forward(self, t, z):
        t = t.reshape(1, 1).to(z)
        return self.conv(z) * torch.sigmoid(self.gate(t))[..., None, None] + self.shift(t)[..., None, None]


class _ConcatSquashStack(nn.Module):
    """Concat-squash layers of the given widths with ``activation`` between them: t scalar, z → dz/dt."""

    def __init__(self, layer, widths, activation):
        super().__init__()
        self.layers = nn.ModuleList(layer(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.activation = activation

    def forward(self, t, z):
        for i, layer in enumerate(self.layers):
            z = layer(t, z)
            if i < len(self.layers) - 1:
                z = self.activation(z)
        return z


class ConcatSquashMLP(_ConcatSquashStack):
    """Dynamics for vectors: ``depth`` hidden concat-squash layers of width ``hidden`` with tanh between
    (smooth, so the solver's steps stay large). t scalar, z (N, D) → dz/dt (N, D)."""

    def __init__(self, dim, hidden=64, depth=3):
        super().__init__(ConcatSquashLinear, [dim] + [hidden] * depth + [dim], torch.tanh)


class ConcatSquashConvNet(_ConcatSquashStack):
    """Dynamics for images: ``depth`` hidden concat-squash 3×3 convolutions of ``hidden`` channels with
    softplus between. t scalar, z (N, C, H, W) → dz/dt (N, C, H, W)."""

    def __init__(self, channels, hidden=32, depth=3):
        super().__init__(ConcatSquashConv2d, [channels] + [hidden] * depth + [channels], F.softplus)


class _Dynamics(nn.Module):
    """The right-hand side the solver integrates. The state is (z,) for the map alone, or (z, log-det) with
    the divergence, or (z, log-det, kinetic energy, Jacobian norm) with the regularisers. ``calls`` counts
    evaluations of the network."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.calls = 0
        self.exact = True
        self.noise = None

    def forward(self, t, state):
        self.calls += 1
        z = state[0]
        if len(state) == 1:
            return (self.net(t, z),)
        create_graph = torch.is_grad_enabled()  # training: the loss differentiates through the divergence
        with torch.enable_grad():
            if not (create_graph and z.requires_grad):  # else only the network is differentiated, from z on
                z = z.detach().requires_grad_(True)
            dz = self.net(t, z)
            noise_jacobian = None
            if self.exact:
                div = exact_divergence(dz, z, create_graph)
            else:
                div, noise_jacobian = hutchinson_divergence(dz, z, self.noise, create_graph)
            if len(state) == 2:
                return dz, div
            if noise_jacobian is None:
                noise_jacobian = torch.autograd.grad(dz, z, self.noise, create_graph=create_graph)[0]
            return dz, div, dz.pow(2).flatten(1).sum(1), noise_jacobian.pow(2).flatten(1).sum(1)


class ContinuousFlow(nn.Module):
    """A continuous normalizing flow: ``z, logdet = flow(x)`` integrates ``dz/dt = net(t, z)`` from 0 to
    ``time``, with ``logdet = ∫ tr(∂f/∂z) dt = log|det ∂z/∂x|`` (the change in log-density); ``flow.inverse(z)``
    integrates back.

    Args:
        net: the dynamics, ``net(t, z)`` of z's shape (:class:`ConcatSquashMLP`, :class:`ConcatSquashConvNet`).
        time: the end time T.
        method, rtol, atol: torchdiffeq's solver and its tolerances.
        adjoint: backpropagate by solving the adjoint ODE (memory constant in the number of steps) instead of
            through the solver's operations.
        divergence: ``"exact"`` or ``"hutchinson"``.
        noise: Hutchinson's noise, ``"rademacher"`` or ``"gaussian"``, drawn once per solve.
        regularize: in training, integrate the kinetic energy and the Jacobian's Frobenius norm beside the
            log-det; after a forward they are in :attr:`kinetic` and :attr:`jacobian` (N,).

    After each solve, :attr:`nfe` holds the number of network evaluations it took.

    Shapes: x (N, ...) → z (N, ...), logdet (N,).
    """

    def __init__(self, net, time=1.0, method="dopri5", rtol=1e-5, atol=1e-5, adjoint=True, divergence="exact",
                 noise="rademacher", regularize=False):
        super().__init__()
        check_choice(divergence, DIVERGENCES, "divergence")
        check_choice(noise, NOISES, "noise")
        check_choice(method, SOLVERS, "method")
        time, rtol, atol = (check_number(v, name, above=0) for v, name in ((time, "time"), (rtol, "rtol"),
                                                                           (atol, "atol")))
        check_flag(adjoint, "adjoint")
        check_flag(regularize, "regularize")
        self.dynamics = _Dynamics(net)
        self.time, self.method, self.rtol, self.atol = time, method, rtol, atol
        self.adjoint, self.divergence, self.noise, self.regularize = adjoint, divergence, noise, regularize
        self.nfe = 0
        self.kinetic = self.jacobian = None

    def _solve(self, state, start, end):
        try:
            from torchdiffeq import odeint, odeint_adjoint
        except ImportError as error:
            raise ImportError("continuous flows need torchdiffeq: pip install torchdiffeq "
                              "(or flowkern[ffjord])") from error

        t = torch.tensor([start, end], dtype=state[0].dtype, device=state[0].device)
        calls = self.dynamics.calls
        if self.adjoint and torch.is_grad_enabled():
            out = odeint_adjoint(self.dynamics, state, t, rtol=self.rtol, atol=self.atol, method=self.method,
                                 adjoint_params=tuple(self.dynamics.parameters()))
        else:
            out = odeint(self.dynamics, state, t, rtol=self.rtol, atol=self.atol, method=self.method)
        self.nfe = self.dynamics.calls - calls
        return [s[-1] for s in out]

    def forward(self, x, divergence=None):
        """``divergence`` overrides the layer's for this call (``"exact"`` for an evaluation). A sample with a
        NaN or inf gives NaN for its z and log-det (the others are solved as if it were absent); an empty
        batch gives empty results."""
        divergence = divergence or self.divergence
        if divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
        regularize = self.regularize and self.training
        finite = _finite_rows(x)
        if finite is not None:  # the solver adapts one step to the whole batch: solve the finite rows alone
            z, logdet = self.forward(x[finite], divergence)
            if regularize:
                self.kinetic, self.jacobian = (_rows_or_nan(finite, v) for v in (self.kinetic, self.jacobian))
            return _rows_or_nan(finite, z), _rows_or_nan(finite, logdet)
        if x.shape[0] == 0:
            self.nfe = 0
            empty = x.new_zeros(0)
            self.kinetic, self.jacobian = (empty, empty) if regularize else (None, None)
            return x * 1, empty
        self.dynamics.exact = divergence == "exact"
        needs_noise = not self.dynamics.exact or regularize
        self.dynamics.noise = draw_noise(x, self.noise) if needs_noise else None
        zeros = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        state = (x, zeros) + ((zeros, zeros) if regularize else ())
        out = self._solve(state, 0.0, self.time)
        self.kinetic, self.jacobian = (out[2], out[3]) if regularize else (None, None)
        return out[0], out[1]

    def inverse(self, z):
        """x from z (N, ...); as :meth:`forward`, a sample with a NaN or inf gives NaN, an empty batch nothing."""
        finite = _finite_rows(z)
        if finite is not None:
            return _rows_or_nan(finite, self.inverse(z[finite]))
        if z.shape[0] == 0:
            self.nfe = 0
            return z * 1
        return self._solve((z,), self.time, 0.0)[0]

    def extra_repr(self):
        return (f"time={self.time}, method={self.method!r}, rtol={self.rtol}, atol={self.atol}, "
                f"adjoint={self.adjoint}, divergence={self.divergence!r}, noise={self.noise!r}")


def _finite_rows(x):
    """The mask (N,) of the samples of ``x`` whose values are all finite, or None when all are."""
    finite = torch.isfinite(x.flatten(1)).all(1)
    return None if bool(finite.all()) else finite


def _rows_or_nan(finite, rows):
    """``rows`` (the finite samples' results) at the places of ``finite`` (N,), NaN elsewhere."""
    out = rows.new_full((finite.shape[0], *rows.shape[1:]), float("nan"))
    return out.index_put((finite,), rows)
