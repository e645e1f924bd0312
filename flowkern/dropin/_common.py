"""What the peers' accelerated layers share: inputs of any rank seen as images, and the hooks check."""
import torch


def as_image(t: torch.Tensor) -> torch.Tensor:
    """``t`` (N, C, *rest) as the (N, C, H, W) the fused ops take: itself when 4-D, else (N, C, prod(rest), 1)."""
    if t.dim() == 4:
        return t
    if t.dim() < 2:
        raise ValueError(f"expected an input of shape (N, C, ...), got shape {tuple(t.shape)}")
    return t.reshape(t.shape[0], t.shape[1], -1, 1)


def like(image: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``image`` (N, C', H, W) back in the rank of ``t`` (N, C, *rest): (N, C', *rest)."""
    return image if t.dim() == 4 else image.reshape(image.shape[0], image.shape[1], *t.shape[2:])


def has_hooks(module: torch.nn.Module) -> bool:
    """Whether ``module`` has forward hooks of its own, which a fused call bypassing it would skip."""
    return bool(module._forward_hooks or module._forward_pre_hooks)
