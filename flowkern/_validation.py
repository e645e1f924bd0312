"""Input checks shared by the functional ops and the layers: clear errors instead of wrong results."""
import math
import numbers
import operator

import torch

from .reference._dtypes import LOWER_PRECISION
from .reference.coupling import LAYOUTS, MASKS, SCALES, conditioner_channels


def check_tensor(x, name, ndim=None, floating=True):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def check_image(x, name="x", channels=None):
    """``x`` must be a floating (N, C, H, W) tensor, with ``channels`` channels when given."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N, C, H, W), got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape (N, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channels, got shape {tuple(x.shape)}")


def check_like(t, x, name, x_name="x"):
    """``t`` must be on ``x``'s device and of its dtype."""
    if t.device != x.device:
        raise ValueError(f"expected {name} on the device of {x_name} ({x.device}), got {t.device}")
    if t.dtype != x.dtype:
        raise TypeError(f"expected {name} with the dtype of {x_name} ({x.dtype}), got {t.dtype}")


def check_module_input(module, x, name="x"):
    """``x`` must match the device and dtype of ``module``'s parameters."""
    param = next(module.parameters(), None)
    if param is not None:
        check_like(x, param, name, x_name=f"the parameters of {type(module).__name__}")


def check_layer_input(layer, x, name="x"):
    """``x`` must be an image (N, ``layer.channels``, H, W) on the device and in the dtype of ``layer``'s
    parameters."""
    check_image(x, name, layer.channels)
    check_module_input(layer, x, name)


def check_choice(value, choices, name):
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_count(value, name, minimum=1):
    """``value`` must be an integer (not a bool) of at least ``minimum``."""
    try:
        if isinstance(value, bool):
            raise TypeError
        operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")


def check_number(value, name, minimum=None, above=None) -> float:
    """``value`` must be a real number (a Python or numpy scalar, or a 0-d tensor; not a bool), finite, at
    least ``minimum`` or above ``above`` when given. Returns it as a float."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, (bool, complex)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or (minimum is not None and value < minimum) or (above is not None and value <= above):
        bound = f" >= {minimum}" if minimum is not None else f" > {above}" if above is not None else ""
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")
    return value


def check_flag(value, name):
    """``value`` must be a bool (a string such as "no" is not taken as True)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def check_temperature(value) -> float:
    """A sampling temperature: a finite number, at least 0 (0 gives every latent's mean). Returns a float."""
    try:
        return check_number(value, "temperature", minimum=0)
    except TypeError:
        raise ValueError(f"temperature must be a finite number >= 0, got {value!r}") from None


def check_coupling(x, h, mask, parity, scale, layout, x_name="x"):
    """The inputs of a coupling: ``x`` (N, C, H, W), its options, and ``h`` of the shape the options need, in
    ``x``'s dtype or a lower precision (a conditioner under autocast)."""
    check_image(x, x_name)
    check_choice(mask, MASKS, "mask")
    check_choice(parity, (0, 1), "parity")
    check_choice(scale, SCALES, "scale")
    check_choice(layout, LAYOUTS, "layout")
    check_image(h, "h")
    if h.device != x.device:
        raise ValueError(f"expected h on the device of {x_name} ({x.device}), got {h.device}")
    if h.dtype != x.dtype and h.dtype not in LOWER_PRECISION.get(x.dtype, ()):
        lower = "".join(f", {t}" for t in LOWER_PRECISION.get(x.dtype, ()))
        raise TypeError(f"expected h of dtype {x.dtype}{lower} for {x_name} of dtype {x.dtype}, got {h.dtype}")
    n, c, height, width = x.shape
    if mask == "channel" and c < 2:
        raise ValueError(f"a channel-mask coupling needs at least 2 channels, got shape {tuple(x.shape)}")
    expected = conditioner_channels(c, mask, parity, scale)[1]
    if h.shape != (n, expected, height, width):
        raise ValueError(
            f"h must have shape {(n, expected, height, width)} for a {mask}-mask {scale} coupling of "
            f"{x_name} with shape {tuple(x.shape)}, got {tuple(h.shape)}"
        )


def check_actnorm(x, log_scale, bias, x_name="x"):
    """ActNorm's inputs: ``x`` (N, C, H, W), ``log_scale`` and ``bias`` (C,) on its device."""
    check_image(x, x_name)
    for name, p in (("log_scale", log_scale), ("bias", bias)):
        check_tensor(p, name, ndim=1)
        if p.shape[0] != x.shape[1]:
            raise ValueError(f"{name} must have shape ({x.shape[1]},) for {x_name} of shape {tuple(x.shape)}")
        if p.device != x.device:
            raise ValueError(f"expected {name} on the device of {x_name} ({x.device}), got {p.device}")


def check_weight(x, weight, x_name="x"):
    """A 1×1 conv's ``weight`` (C_out, C_in) for ``x`` (N, C_in, H, W)."""
    check_tensor(weight, "weight", ndim=2)
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight must have shape (C_out, {x.shape[1]}) for {x_name} of shape {tuple(x.shape)}, "
                         f"got {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"expected weight on the device of {x_name} ({x.device}), got {weight.device}")


def check_folded_lu_weight(perm, lower, upper, sign, log_s, log_scale, bias):
    """An LU 1×1 conv's factors, ``perm``, ``lower``, ``upper`` (C, C) and ``sign``, ``log_s`` (C,), and the
    ``log_scale``, ``bias`` (C,) of the ActNorm before it, on one device."""
    check_tensor(perm, "perm", ndim=2)
    c = perm.shape[0]
    if perm.shape[1] != c:
        raise ValueError(f"perm must be a square (C, C) matrix, got shape {tuple(perm.shape)}")
    for name, t, shape in (("lower", lower, (c, c)), ("upper", upper, (c, c)), ("sign", sign, (c,)),
                           ("log_s", log_s, (c,)), ("log_scale", log_scale, (c,)), ("bias", bias, (c,))):
        check_tensor(t, name, ndim=len(shape))
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} for a perm of shape {tuple(perm.shape)}, "
                             f"got {tuple(t.shape)}")
        if t.device != perm.device:
            raise ValueError(f"expected {name} on the device of perm ({perm.device}), got {t.device}")


def check_fold_actnorms(weight1, log_scale1, weight2, log_scale2, grad1=None, grad2=None):
    """Two (weight (O, ...), log_scale (O,)) pairs of one floating dtype on one device, and the gradients of
    the folded weights (the weights' shapes, any floating dtype) when given."""
    for i, (weight, log_scale, grad) in enumerate(((weight1, log_scale1, grad1), (weight2, log_scale2, grad2)), 1):
        check_tensor(weight, f"weight{i}")
        check_tensor(log_scale, f"log_scale{i}", ndim=1)
        if weight.dim() == 0 or log_scale.shape[0] != weight.shape[0]:
            raise ValueError(f"log_scale{i} must have shape ({weight.shape[0] if weight.dim() else 'O'},) for one "
                             f"scale per output channel of weight{i} (shape {tuple(weight.shape)}), got "
                             f"{tuple(log_scale.shape)}")
        for name, t in ((f"weight{i}", weight), (f"log_scale{i}", log_scale)):
            check_like(t, weight1, name, "weight1")
        if grad is not None:
            check_tensor(grad, f"grad{i}")
            if grad.shape != weight.shape or grad.device != weight.device:
                raise ValueError(f"grad{i} must have the shape {tuple(weight.shape)} of weight{i}, on "
                                 f"{weight.device}, got {tuple(grad.shape)} on {grad.device}")


def check_conv1x1(x, weight, bias, x_name="x"):
    """A 1×1 conv's inputs: ``x`` (N, C_in, H, W), ``weight`` (C_out, C_in), ``bias`` (C_out,) or None."""
    check_image(x, x_name)
    check_weight(x, weight, x_name)
    if bias is not None:
        check_tensor(bias, "bias", ndim=1)
        if bias.shape[0] != weight.shape[0] or bias.device != x.device:
            raise ValueError(f"bias must have shape ({weight.shape[0]},) on {x.device}, "
                             f"got {tuple(bias.shape)} on {bias.device}")


def check_grad_out(grad_out, inp, what="the output", name="grad_out"):
    """A backward op's incoming gradient: a floating tensor of ``what``'s shape on ``inp``'s device."""
    check_tensor(grad_out, name)
    if grad_out.device != inp.device:
        raise ValueError(f"expected {name} on the device of the input ({inp.device}), got {grad_out.device}")
    shape = tuple(inp.shape) if what == "the output" else what
    if tuple(grad_out.shape) != shape:
        raise ValueError(f"expected {name} of shape {shape}, got {tuple(grad_out.shape)}")
