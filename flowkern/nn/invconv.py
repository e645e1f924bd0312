import torch
from torch import nn

from .. import functional
from ..reference import conv1x1_logdet, lu_weight, lu_weight_inverse
from .._validation import check_count, check_flag, check_layer_input
from ..reference._dtypes import compute_dtype


class InvConv1x1(nn.Module):
    """Invertible 1×1 convolution (Kingma & Dhariwal 2018), initialised to a random rotation.

    With ``lu=True`` the weight is ``W = P · L · (U + diag(sign · exp(log_s)))``: the log-det is
    ``H · W · Σ log_s`` and the inverse weight comes from triangular solves. With ``lu=False`` the
    weight is a free matrix, its log-det from ``slogdet`` and its inverse from a float64 solve.
    ``P`` and ``sign`` are buffers, so they survive ``state_dict`` round trips.

    In evaluation mode, where no gradient is recorded (sampling, evaluation), ``W`` and ``W⁻¹`` are kept
    and reused while the factors hold the values they were built from. The factors are compared by value,
    not by version counter: fused optimisers (``torch.optim.Adam(fused=True)``) and writes through
    ``.data`` update parameters without bumping it.

    Shapes: x (N, C, H, W) → y (N, C, H, W), logdet (N,).
    """

    def __init__(self, channels: int, lu: bool = True):
        super().__init__()
        check_count(channels, "channels")
        check_flag(lu, "lu")
        self.channels = channels
        self.lu = lu
        rotation = torch.linalg.qr(torch.randn(channels, channels, dtype=torch.float64))[0]
        if lu:
            perm, lower, upper = torch.linalg.lu(rotation)
            diag = torch.diagonal(upper)
            self.register_buffer("perm", perm.float())
            self.register_buffer("sign", torch.sign(diag).float())
            self.lower = nn.Parameter(torch.tril(lower, -1).float())
            self.upper = nn.Parameter(torch.triu(upper, 1).float())
            self.log_s = nn.Parameter(torch.log(diag.abs()).float())
        else:
            self.weight = nn.Parameter(rotation.float())
        self.clear_cache()

    def _factors(self):
        return (self.perm, self.lower, self.upper, self.sign, self.log_s) if self.lu else (self.weight,)

    def clear_cache(self):
        """Forget the cached ``W`` and ``W⁻¹``."""
        self._cache = {}

    def _cached(self, name, build):
        """``build(*factors)``, reused in evaluation mode while no gradient is recorded and the factors are
        unchanged: comparing the C² values is a fraction of the cost of the products and triangular solves."""
        factors = self._factors()
        if self.training or torch.compiler.is_compiling() or (
                torch.is_grad_enabled() and any(t.requires_grad for t in factors)):
            return build(*factors)  # in training the factors change every step: nothing to reuse
        hit = self._cache.get(name)
        if hit is None or not all(s.dtype == t.dtype and s.device == t.device and torch.equal(s, t)
                                  for s, t in zip(hit[0], factors)):
            hit = self._cache[name] = ([t.detach().clone() for t in factors], build(*factors))
        return hit[1]

    def weight_matrix(self) -> torch.Tensor:
        """The (C, C) mixing matrix."""
        return self._cached("weight", lu_weight) if self.lu else self.weight

    def inverse_weight_matrix(self) -> torch.Tensor:
        """The (C, C) inverse mixing matrix."""
        if self.lu:
            return self._cached("inverse", lu_weight_inverse)
        return self._cached("inverse", lambda w: torch.linalg.inv(w.double()).to(w.dtype))

    def logdet(self, x):
        """Log-det of the layer over ``x`` (N, C, H, W), shape (N,)."""
        if self.lu:
            return conv1x1_logdet(x, self.log_s)
        per_pixel = torch.linalg.slogdet(self.weight.double())[1]
        return (per_pixel * (x.shape[2] * x.shape[3])).to(compute_dtype(x.dtype)).expand(x.shape[0])

    def forward(self, x):
        check_layer_input(self, x, "x")
        return functional.conv1x1(x, self.weight_matrix()), self.logdet(x)

    def inverse(self, y):
        check_layer_input(self, y, "y")
        return functional.conv1x1(y, self.inverse_weight_matrix())

    def extra_repr(self):
        return f"{self.channels}, lu={self.lu}"
