"""Space-to-channel reshapes used between the levels of a multi-scale flow (volume preserving)."""
import torch


def squeeze(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """(N, C, H, W) → (N, C·f², H/f, W/f): each f×f block of pixels becomes f² channels."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // factor, factor, w // factor, factor)
    return x.permute(0, 1, 3, 5, 2, 4).reshape(n, c * factor * factor, h // factor, w // factor)


def unsqueeze(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """(N, C·f², H, W) → (N, C, H·f, W·f), the inverse of :func:`squeeze`."""
    n, c, h, w = x.shape
    x = x.reshape(n, c // (factor * factor), factor, factor, h, w)
    return x.permute(0, 1, 4, 2, 5, 3).reshape(n, c // (factor * factor), h * factor, w * factor)
