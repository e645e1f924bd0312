import functools

import torch

# Where a low-precision h may meet x: the conditioner runs in the autocast dtype, the flow's state does not.
LOWER_PRECISION = {torch.float32: (torch.float16, torch.bfloat16), torch.float64: (torch.float32, torch.float16,
                                                                                   torch.bfloat16)}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic and log-det dtype for a tensor dtype: float64 stays, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def full_precision(fn):
    """Run ``fn`` with autocast off: under ``torch.autocast`` only the conditioners run in the low-precision
    dtype; the flow's own math (its state, the 1×1 conv and its LU weight, log-dets) keeps its dtype."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if torch.is_autocast_enabled("cuda"):
            with torch.autocast("cuda", enabled=False):
                return wrapper(*args, **kwargs)
        if torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)
    return wrapper
