"""Affine and additive coupling: the specification every coupling kernel is tested against.

Notation, for an input ``x`` of shape (N, C, H, W):

* The mask decides which elements pass through unchanged and which are transformed.
  ``"channel"``: ``x.chunk(2, dim=1)`` gives a first part of ``ceil(C/2)`` channels and a second of
  ``floor(C/2)``; parity 0 passes the first part and transforms the second, parity 1 the reverse.
  ``"checkerboard"``: the pixel (i, j) is transformed where ``(i + j + parity) % 2 == 1``, in every channel.
* ``h`` is the conditioner's output, computed from the pass-through elements only. With C_t the number
  of transformed channels (C for the checkerboard), affine scales take ``h`` of shape (N, 2·C_t, H, W)
  laid out as ``raw, shift = h.chunk(2, dim=1)``; additive coupling takes ``h = shift`` of shape
  (N, C_t, H, W). Entries of ``h`` at pass-through pixels of the checkerboard are ignored.
* The transformed elements become ``y = x · s + shift`` with ``log s`` given by the scale:
  ``"sigmoid"`` (Glow) ``log s = log sigmoid(raw + 2)``; ``"exp"`` (RealNVP) ``log s = bound · tanh(raw)``;
  ``"additive"`` ``s = 1``.
* The log-det is ``Σ log s`` over the transformed elements of each sample, shape (N,), accumulated in
  float32 (float64 for float64 inputs). ``coupling_inverse`` returns the same quantity: the log-det of the
  forward map at the reconstructed ``x``.
"""
import torch
import torch.nn.functional as F

from ._dtypes import compute_dtype

MASKS = ("channel", "checkerboard")
SCALES = ("sigmoid", "exp", "additive")


def channel_split_sizes(channels: int, parity: int) -> tuple[int, int]:
    """(pass-through channels, transformed channels) of the channel mask."""
    first = (channels + 1) // 2
    second = channels - first
    return (first, second) if parity == 0 else (second, first)


def channel_layout(channels: int, mask: str, parity: int) -> tuple[int, int, int, int]:
    """(first pass-through channel, their count, first transformed channel, their count) in ``x``: the
    channel mask passes one half (the first ``ceil(C/2)`` channels or the rest) and transforms the other;
    the checkerboard mask transforms every channel (at half of the pixels)."""
    if mask == "checkerboard":
        return 0, 0, 0, channels
    n_pass, n_t = channel_split_sizes(channels, parity)
    return (0, n_pass, n_pass, n_t) if parity == 0 else (n_t, n_pass, 0, n_t)


def transformed_channels(channels: int, mask: str, parity: int) -> int:
    return channel_split_sizes(channels, parity)[1] if mask == "channel" else channels


def conditioner_channels(channels: int, mask: str, parity: int, scale: str) -> tuple[int, int]:
    """(input, output) channel counts of the conditioner network for a coupling over ``channels``."""
    n_in = channel_split_sizes(channels, parity)[0] if mask == "channel" else channels
    n_t = transformed_channels(channels, mask, parity)
    return n_in, (n_t if scale == "additive" else 2 * n_t)


def checkerboard(height: int, width: int, parity: int, device=None) -> torch.Tensor:
    """Boolean (H, W) mask, True where the checkerboard coupling transforms."""
    i = torch.arange(height, device=device).view(-1, 1)
    j = torch.arange(width, device=device).view(1, -1)
    return (i + j + parity) % 2 == 1


def coupling_condition(x: torch.Tensor, mask: str, parity: int) -> torch.Tensor:
    """The conditioner's input: the pass-through channels, or ``x`` with transformed pixels zeroed."""
    if mask == "channel":
        first, second = x.chunk(2, dim=1)
        return first if parity == 0 else second
    transformed = checkerboard(x.shape[2], x.shape[3], parity, x.device)
    return x.masked_fill(transformed, 0.0)


def log_scale(raw: torch.Tensor, scale: str, bound: float) -> torch.Tensor:
    if scale == "sigmoid":
        return F.logsigmoid(raw + 2.0)
    return bound * torch.tanh(raw)


def _split(t: torch.Tensor, parity: int) -> tuple[torch.Tensor, torch.Tensor]:
    first, second = t.chunk(2, dim=1)
    return (first, second) if parity == 0 else (second, first)


def _merge(passed: torch.Tensor, transformed: torch.Tensor, parity: int) -> torch.Tensor:
    return torch.cat((passed, transformed) if parity == 0 else (transformed, passed), dim=1)


def _affine(x, h, mask, parity, scale, bound, inverse):
    n = x.shape[0]
    ct = compute_dtype(x.dtype)
    x, h = x.to(ct), h.to(ct)
    if mask == "channel":
        passed, t = _split(x, parity)
        where = None
    else:
        passed, t = None, x
        where = checkerboard(x.shape[2], x.shape[3], parity, x.device)

    if scale == "additive":
        shift, logs = h, None
    else:
        raw, shift = h.chunk(2, dim=1)
        logs = log_scale(raw, scale, bound)
    if where is not None:
        shift = shift.masked_fill(~where, 0.0)
        logs = None if logs is None else logs.masked_fill(~where, 0.0)

    if logs is None:
        out = t - shift if inverse else t + shift
        logdet = torch.zeros(n, dtype=ct, device=x.device)
    else:
        out = (t - shift) * torch.exp(-logs) if inverse else t * torch.exp(logs) + shift
        logdet = logs.flatten(1).sum(dim=1)
    if passed is not None:
        out = _merge(passed, out, parity)
    return out, logdet


def coupling_forward(x, h, mask="channel", parity=0, scale="sigmoid", bound=2.0):
    """(x (N, C, H, W), h) → (y of x's shape and dtype, logdet (N,))."""
    y, logdet = _affine(x, h, mask, parity, scale, bound, inverse=False)
    return y.to(x.dtype), logdet


def coupling_backward(grad_y, grad_logdet, x, h, mask="channel", parity=0, scale="sigmoid", bound=2.0):
    """The gradients ``(∂x, ∂h)`` of :func:`coupling_forward` at ``(x, h)`` from those of its outputs, ``grad_y``
    (N, C, H, W) and ``grad_logdet`` (N,), either ``None`` for zero: by autograd through it."""
    with torch.enable_grad():
        x_leaf, h_leaf = x.detach().requires_grad_(), h.detach().requires_grad_()
        outputs = [(o, g) for o, g in zip(coupling_forward(x_leaf, h_leaf, mask, parity, scale, bound),
                                          (grad_y, grad_logdet)) if g is not None and o.requires_grad]
        if not outputs:
            return torch.zeros_like(x), torch.zeros_like(h)
        outputs, upstream = zip(*outputs)
        grads = torch.autograd.grad(outputs, (x_leaf, h_leaf), upstream, allow_unused=True)
    return tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, (x, h)))


def coupling_inverse(y, h, mask="channel", parity=0, scale="sigmoid", bound=2.0):
    """(y (N, C, H, W), h) → (x of y's shape and dtype, logdet (N,) of the forward map)."""
    x, logdet = _affine(y, h, mask, parity, scale, bound, inverse=True)
    return x.to(y.dtype), logdet
