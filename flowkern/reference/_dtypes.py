import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic and log-det dtype for a tensor dtype: float64 stays, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
