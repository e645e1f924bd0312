"""What the peers' accelerated layers share: inputs of any rank seen as images, the hooks check, and Glow's
conditioner recognised in a peer's network."""
import torch
from torch import nn

from ..nn.conditioners import FORM_FUNCTIONS, conditioner_form


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


def _is_conv(layer, kernel_size):
    return (type(layer) is nn.Conv2d and layer.kernel_size == (kernel_size, kernel_size) and layer.bias is not None
            and layer.stride == (1, 1) and layer.dilation == (1, 1) and layer.groups == 1
            and layer.padding == (kernel_size // 2,) * 2 and layer.padding_mode == "zeros")


def glow_convolutions(layers, relu_types=(nn.ReLU,)):
    """The three convolutions of ``layers`` when they are Glow's conditioner, conv3×3 → ReLU → conv1×1 → ReLU →
    conv3×3 with biases (a ReLU one of ``relu_types``, a ``LeakyReLU`` counting with slope 0), none with hooks;
    else None."""
    layers = list(layers)
    if len(layers) != 5 or any(has_hooks(layer) for layer in layers):
        return None
    relu = [type(r) in relu_types and (type(r) is not nn.LeakyReLU or r.negative_slope == 0) for r in layers[1::2]]
    convolutions = layers[::2]
    if all(relu) and all(_is_conv(conv, k) for conv, k in zip(convolutions, (3, 1, 3))):
        return convolutions
    return None


def run_glow_conditioner(convolutions, x):
    """Glow's conditioner from its three convolutions on ``x``, in the fastest form measured for its shape
    (:func:`flowkern.nn.conditioners.conditioner_form`), the ReLUs in place; its output in the memory format
    the peer's network returns (contiguous), whatever the form ran in."""
    first, hidden, last = convolutions
    weights = (first.weight, first.bias, hidden.weight, hidden.bias, last.weight, last.bias)
    widths = (first.in_channels, last.in_channels, last.out_channels)
    return FORM_FUNCTIONS[conditioner_form(x, widths, lambda: weights)](x, *weights).contiguous()
