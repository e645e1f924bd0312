"""Affine and additive coupling: the specification every coupling kernel is tested against.

Notation, for an input ``x`` of shape (N, C, H, W):

* The mask decides which elements pass through unchanged and which are transformed.
  ``"channel"``: ``x.chunk(2, dim=1)`` gives a first part of ``ceil(C/2)`` channels and a second of
  ``floor(C/2)``; parity 0 passes the first part and transforms the second, parity 1 the reverse.
  ``"checkerboard"``: the pixel (i, j) is transformed where ``(i + j + parity) % 2 == 1``, in every channel.
* ``h`` is the conditioner's output, computed from the pass-through elements only. With C_t the number
  of transformed channels (C for the checkerboard), affine scales take ``h`` of shape (N, 2·C_t, H, W)
  holding ``raw`` and ``shift`` in the order ``layout`` names: ``"halves"`` (flowkern, FrEIA)
  ``raw, shift = h.chunk(2, dim=1)``; ``"shift_halves"`` (nflows) ``shift, raw = h.chunk(2, dim=1)``;
  ``"interleaved"`` (normflows) ``shift, raw = h[:, 0::2], h[:, 1::2]``. Additive coupling takes
  ``h = shift`` of shape (N, C_t, H, W), whatever the layout. Entries of ``h`` at pass-through pixels of the
  checkerboard are ignored.
* The transformed elements become ``y = x · s + shift`` with ``log s`` given by the scale:
  ``"sigmoid"`` (Glow) ``log s = log sigmoid(raw + 2)``; ``"reciprocal_sigmoid"`` ``log s = −log sigmoid(raw + 2)``
  (normflows' "sigmoid", whose latent → data map divides by the sigmoid); ``"exp"`` (RealNVP)
  ``log s = bound · tanh(raw)``; ``"plain_exp"`` ``log s = raw``; ``"atan"`` (FrEIA's default clamp)
  ``log s = 0.636 · bound · atan(raw)``, with FrEIA's constant 0.636 for 2/π; ``"offset_sigmoid"`` (nflows)
  ``s = sigmoid(raw + 2) + 0.001``; ``"additive"`` ``s = 1``.
* The log-det is ``Σ log s`` over the transformed elements of each sample, shape (N,), accumulated in
  float32 (float64 for float64 inputs). ``coupling_inverse`` returns the same quantity: the log-det of the
  forward map at the reconstructed ``x``.
"""
import torch
import torch.nn.functional as F

from ._dtypes import compute_dtype

MASKS = ("channel", "checkerboard")
SCALES = ("sigmoid", "reciprocal_sigmoid", "exp", "plain_exp", "atan", "offset_sigmoid", "additive")
LAYOUTS = ("halves", "shift_halves", "interleaved")
ATAN_GAIN = 0.636  # FrEIA's factor before atan: log s stays inside ±0.999·bound
SIGMOID_OFFSET = 1e-3  # nflows' floor on its sigmoid scale


def channel_split_sizes(channels: int, parity: int) -> tuple[int, int]:
    """(pass-through channels, transformed channels) of the channel mask."""
    first = (channels + 1) // 2
    second = channels - first
    return (first, second) if parity == 0 else (second, first)


def transformed_range(channels: int, mask: str, parity: int) -> tuple[int, int]:
    """(first transformed channel, their count) in ``x``: the channel mask passes one half (the first
    ``ceil(C/2)`` channels or the rest) and transforms the other; the checkerboard mask transforms every
    channel (at half of the pixels)."""
    if mask == "checkerboard":
        return 0, channels
    n_pass, n_t = channel_split_sizes(channels, parity)
    return (n_pass, n_t) if parity == 0 else (0, n_t)


def h_planes(n_t: int, scale: str, layout: str) -> tuple[int, int, int]:
    """Where transformed channel k finds its terms in ``h``: ``(raw_first, shift_first, step)``, raw at plane
    ``raw_first + step·k`` and shift at ``shift_first + step·k``."""
    if scale == "additive":
        return 0, 0, 1
    return {"halves": (0, n_t, 1), "shift_halves": (n_t, 0, 1), "interleaved": (1, 0, 2)}[layout]


def split_h(h: torch.Tensor, scale: str, layout: str) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(raw, shift)`` of ``h`` as ``layout`` orders them; raw is ``None`` for additive coupling."""
    if scale == "additive":
        return None, h
    n_t = h.shape[1] // 2
    raw_first, shift_first, step = h_planes(n_t, scale, layout)
    return h[:, raw_first:raw_first + step * n_t:step], h[:, shift_first:shift_first + step * n_t:step]


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
    if scale == "reciprocal_sigmoid":
        return -F.logsigmoid(raw + 2.0)
    if scale == "plain_exp":
        return raw
    if scale == "atan":
        return ATAN_GAIN * bound * torch.atan(raw)
    if scale == "offset_sigmoid":
        return torch.log(torch.sigmoid(raw + 2.0) + SIGMOID_OFFSET)
    return bound * torch.tanh(raw)


def _split(t: torch.Tensor, parity: int) -> tuple[torch.Tensor, torch.Tensor]:
    first, second = t.chunk(2, dim=1)
    return (first, second) if parity == 0 else (second, first)


def _merge(passed: torch.Tensor, transformed: torch.Tensor, parity: int) -> torch.Tensor:
    return torch.cat((passed, transformed) if parity == 0 else (transformed, passed), dim=1)


def _affine(x, h, mask, parity, scale, bound, layout, inverse):
    n = x.shape[0]
    ct = compute_dtype(x.dtype)
    x, h = x.to(ct), h.to(ct)
    if mask == "channel":
        passed, t = _split(x, parity)
        where = None
    else:
        passed, t = None, x
        where = checkerboard(x.shape[2], x.shape[3], parity, x.device)

    raw, shift = split_h(h, scale, layout)
    logs = None if raw is None else log_scale(raw, scale, bound)
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


def coupling_forward(x, h, mask="channel", parity=0, scale="sigmoid", bound=2.0, layout="halves"):
    """(x (N, C, H, W), h) → (y of x's shape and dtype, logdet (N,))."""
    y, logdet = _affine(x, h, mask, parity, scale, bound, layout, inverse=False)
    return y.to(x.dtype), logdet


def coupling_backward(grad_y, grad_logdet, x, h, mask="channel", parity=0, scale="sigmoid", bound=2.0,
                      layout="halves"):
    """The gradients ``(∂x, ∂h)`` of :func:`coupling_forward` at ``(x, h)`` from those of its outputs, ``grad_y``
    (N, C, H, W) and ``grad_logdet`` (N,), either ``None`` for zero: by autograd through it."""
    with torch.enable_grad():
        x_leaf, h_leaf = x.detach().requires_grad_(), h.detach().requires_grad_()
        outputs = [(o, g) for o, g in zip(coupling_forward(x_leaf, h_leaf, mask, parity, scale, bound, layout),
                                          (grad_y, grad_logdet)) if g is not None and o.requires_grad]
        if not outputs:
            return torch.zeros_like(x), torch.zeros_like(h)
        outputs, upstream = zip(*outputs)
        grads = torch.autograd.grad(outputs, (x_leaf, h_leaf), upstream, allow_unused=True)
    return tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, (x, h)))


def coupling_inverse(y, h, mask="channel", parity=0, scale="sigmoid", bound=2.0, layout="halves"):
    """(y (N, C, H, W), h) → (x of y's shape and dtype, logdet (N,) of the forward map)."""
    x, logdet = _affine(y, h, mask, parity, scale, bound, layout, inverse=True)
    return x.to(y.dtype), logdet
