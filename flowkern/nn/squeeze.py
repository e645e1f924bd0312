from torch import nn

from ..reference import squeeze, unsqueeze
from .._validation import check_count, check_image
from ..reference._dtypes import compute_dtype


class Squeeze(nn.Module):
    """Space-to-channel: each f×f block of pixels becomes f² channels (volume preserving).

    Shapes: x (N, C, H, W) → y (N, C·f², H/f, W/f), logdet (N,) of zeros.
    """

    def __init__(self, factor: int = 2):
        super().__init__()
        check_count(factor, "factor")
        self.factor = factor

    def forward(self, x):
        check_image(x, "x")
        if x.shape[2] % self.factor or x.shape[3] % self.factor:
            raise ValueError(f"Squeeze(factor={self.factor}) needs H and W divisible by {self.factor}, "
                             f"got shape {tuple(x.shape)}")
        return squeeze(x, self.factor), x.new_zeros(x.shape[0], dtype=compute_dtype(x.dtype))

    def inverse(self, y):
        check_image(y, "y")
        if y.shape[1] % (self.factor ** 2):
            raise ValueError(f"Squeeze.inverse needs a channel count divisible by {self.factor ** 2}, "
                             f"got shape {tuple(y.shape)}")
        return unsqueeze(y, self.factor)

    def extra_repr(self):
        return f"factor={self.factor}"
