import torch
import torch.distributed as dist
from torch import nn

from .. import functional
from .._validation import check_count, check_layer_input, check_number


class BufferFlag:
    """A flag buffer's truth value, read from the device again only when the buffer has been written or
    replaced since the last read (its version or storage changed), so a forward does not wait on the device.
    Compiled code gets the value of the last eager read."""

    def __init__(self):
        self.value, self._seen = False, None

    def __call__(self, buffer: torch.Tensor) -> bool:
        if torch.compiler.is_compiling():
            return self.value
        seen = (buffer.data_ptr(), buffer._version)
        if seen != self._seen:
            self.value, self._seen = bool(buffer), seen
        return self.value


class ActNorm(nn.Module):
    """Per-channel affine normalisation ``y = x · exp(log_scale) + bias`` (Kingma & Dhariwal 2018).

    The first forward in training mode sets ``log_scale`` and ``bias`` so that the output has zero mean
    and unit variance per channel on that batch (statistics all-reduced across processes when
    ``torch.distributed`` is initialised). The ``initialized`` flag is a buffer and the layer reads it, so
    a model restored from a ``state_dict``, or given parameters with the flag set, is not initialised
    again. A channel with zero variance keeps scale 1; an empty batch initialises nothing; a batch with a NaN
    or inf is refused (ValueError) and leaves the layer uninitialised.

    Shapes: x (N, C, H, W) → y (N, C, H, W), logdet (N,) = H · W · Σ log_scale.
    """

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        check_count(channels, "channels")
        self.channels = channels
        self.eps = check_number(eps, "eps", above=0)
        self.log_scale = nn.Parameter(torch.zeros(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("initialized", torch.tensor(False))
        self._initialized = BufferFlag()  # the buffer is the truth; this reads it without waiting on the device

    def is_initialized(self) -> bool:
        """The ``initialized`` buffer's value (compiled code: its value when last read eagerly, initialised
        or loaded from a ``state_dict``)."""
        return self._initialized(self.initialized)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.is_initialized()  # read eagerly, for code compiled before the next forward

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Set the parameters from the batch ``x`` (N, C, H, W) so that the output is standardised."""
        xf = x.double().transpose(0, 1).reshape(self.channels, -1)
        stats = torch.stack([xf.sum(1), xf.pow(2).sum(1), xf.new_full((self.channels,), xf.shape[1])])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
        total, total_sq, count = stats
        if count[0] == 0:  # an empty batch (on every process): nothing to initialise from
            return
        if not torch.isfinite(stats).all():  # NaN or inf in the batch (of any process)
            raise ValueError(f"ActNorm({self.channels}) initialises from its first training batch, which holds "
                             "NaN or inf values; it stays uninitialised: pass finite data")
        mean = total / count
        std = (total_sq / count - mean.pow(2)).clamp_min(0).sqrt()
        log_scale = torch.where(std > self.eps, -torch.log(std.clamp_min(self.eps)), torch.zeros_like(std))
        self.log_scale.copy_(log_scale)
        self.bias.copy_(-mean * torch.exp(log_scale))
        self.initialized.fill_(True)
        self.is_initialized()

    def will_initialize(self) -> bool:
        """Whether the next forward sets the parameters from its batch (training mode, not yet initialised):
        that forward must run ActNorm as its own pass, not folded into a neighbouring layer."""
        return self.training and not self.is_initialized()

    def forward(self, x):
        check_layer_input(self, x, "x")
        if self.will_initialize():
            self.initialize(x)
        return functional.actnorm_forward(x, self.log_scale, self.bias)

    def inverse(self, y):
        check_layer_input(self, y, "y")
        return functional.actnorm_inverse(y, self.log_scale, self.bias)[0]

    def extra_repr(self):
        return f"{self.channels}"
