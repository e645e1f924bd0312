"""A Glow coupling with its default conditioner as one autograd node: :class:`GlowCoupling`.

The conditioner ``conv3×3 → ActNorm → ReLU → conv1×1 → ActNorm → ReLU → zero conv3×3`` (both ActNorms folded
into their convolutions, :class:`~flowkern.nn.conditioners.ConvActNorm`) and the coupling transform with its
log-det run in one forward, and one hand-written backward computes every gradient: each convolution's input,
weight and bias gradients in one ``convolution_backward``, each ReLU's in one ``threshold_backward`` on the
saved post-ReLU activation, both folded ActNorms' in one ``fold_actnorms_backward``, and the conditioner's input
gradient added into the coupling's in place. Autograd through the same modules records the channel split's
zero-padded ``cat`` and the gradient accumulation besides. The coupling transform runs as the active
backend's op, and its backward as that backend's ``coupling_backward``.

Under ``torch.autocast`` the conditioner runs in the autocast dtype, as the modules do, and its gradients come
back in the parameters' dtypes.
"""
import torch
import torch.nn.functional as F

from .. import backends, functional
from ..reference import coupling_condition
from .conditioners import form_input


def conditioner_weights(conditioner):
    """The tensors the node differentiates: ``(w1, log_scale1, b1, w2, log_scale2, b2, w3, b3)`` of a
    :class:`~flowkern.nn.conditioners.GlowConditioner` whose ActNorms fold."""
    first, hidden, last = conditioner
    return (first.conv.weight, first.norm.log_scale, first.norm.bias, hidden.conv.weight, hidden.norm.log_scale,
            hidden.norm.bias, last.weight, last.bias)


def _low_precision(device_type):
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def conditioner_activations(condition, weights, paddings):
    """The conditioner's forward from its input (N, C_in, H, W): ``(h1, h2, h, operands)``, ``h1, h2`` the
    post-ReLU hidden activations, ``h`` its output and ``operands`` the convolutions' input and weights as they
    ran (the ActNorms folded in by :func:`flowkern.functional.fold_actnorms`; in the autocast dtype under
    autocast)."""
    w1, log_scale1, b1, w2, log_scale2, b2, w3, b3 = weights
    operands = (condition, *functional.fold_actnorms(w1, log_scale1, w2, log_scale2), w3, b1, b2, b3)
    low = _low_precision(condition.device.type)
    if low is not None:
        operands = tuple(t.to(low) for t in operands)
    condition, w1f, w2f, w3, b1, b2, b3 = operands
    with torch.autocast(condition.device.type, enabled=False):
        h1 = F.conv2d(condition, w1f, b1, padding=paddings[0]).relu_()
        h2 = F.conv2d(h1, w2f, b2, padding=paddings[1]).relu_()
        h = F.conv2d(h2, w3, b3, padding=paddings[2])
    return h1, h2, h, operands[:4]


def _convolution_backward(grad, inp, weight, padding, input_needed):
    return torch.ops.aten.convolution_backward(grad, inp, weight, [weight.shape[0]], [1, 1], list(padding), [1, 1],
                                               False, [0, 0], 1, [input_needed, True, True])


class GlowCoupling(torch.autograd.Function):
    """``(y, logdet) = coupling(x, conditioner(pass part of x))`` for an
    :class:`~flowkern.nn.AffineCoupling` (or additive one) with a folding
    :class:`~flowkern.nn.conditioners.GlowConditioner`, as one node.

    ``apply(x, *conditioner_weights(conditioner), coupling, activations, form)``: ``coupling`` the layer (its
    mask, parity, scale and bound, and the conditioner's paddings); ``activations`` ``None``, or what
    :func:`conditioner_activations` returned for this ``x`` when the caller ran it already (training by
    inversion: the conditioner ran to invert the coupling, and does not run again); ``form`` the conditioner's
    form for this call (``"convolutions"`` or ``"channels-last convolutions"``), chosen by the caller where
    gradients are recorded.

    Shapes: x (N, C, H, W) → y (N, C, H, W), logdet (N,).
    """

    @staticmethod
    def forward(ctx, x, w1, log_scale1, b1, w2, log_scale2, b2, w3, b3, coupling, activations, form):
        weights = (w1, log_scale1, b1, w2, log_scale2, b2, w3, b3)
        paddings = coupling.conditioner.paddings()
        if activations is None:
            condition = form_input(coupling_condition(x, coupling.mask, coupling.parity), form)
            activations = conditioner_activations(condition, weights, paddings)
        h1, h2, h, operands = activations
        options = coupling._options()
        # the backends that run the coupling's forward and the folds run their backwards too
        ctx.backend = backends.choose("coupling_forward", x, h, *options.values())
        ctx.fold_backend = backends.choose("fold_actnorms", w1, log_scale1, w2, log_scale2)
        y, logdet = functional.coupling_forward(x, h, **options)
        ctx.save_for_backward(x, h, h1, h2, *operands, *weights)
        ctx.coupling, ctx.paddings = coupling, paddings
        return y, logdet

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, grad_logdet):
        x, h, h1, h2, condition, w1f, w2f, w3, *weights = ctx.saved_tensors
        w1, log_scale1, b1, w2, log_scale2, b2, w3_param, b3 = weights
        coupling = ctx.coupling
        grad_x, grad_h = functional.coupling_backward(grad_y, grad_logdet, x, h, **coupling._options(),
                                                      backend=ctx.backend)
        pad1, pad2, pad3 = ctx.paddings
        grad_h2, grad_w3, grad_b3 = _convolution_backward(grad_h.to(h2.dtype), h2, w3, pad3, True)
        grad_h2 = torch.ops.aten.threshold_backward(grad_h2, h2, 0)
        grad_h1, grad_w2f, grad_b2 = _convolution_backward(grad_h2, h1, w2f, pad2, True)
        grad_h1 = torch.ops.aten.threshold_backward(grad_h1, h1, 0)
        need_x = ctx.needs_input_grad[0]
        grad_condition, grad_w1f, grad_b1 = _convolution_backward(grad_h1, condition, w1f, pad1, need_x)
        if need_x:
            if grad_y is not None and grad_x.untyped_storage().data_ptr() == grad_y.untyped_storage().data_ptr():
                grad_x = grad_x.clone()  # a backend may hand back the upstream gradient itself: it is not ours
            if coupling.mask == "channel":
                grad_x.chunk(2, dim=1)[coupling.parity].add_(grad_condition)
            else:
                grad_x = grad_x + coupling_condition(grad_condition, coupling.mask, coupling.parity)
        grad_w1, grad_log_scale1, grad_w2, grad_log_scale2 = functional.fold_actnorms_backward(
            grad_w1f, w1, log_scale1, grad_w2f, w2, log_scale2, ctx.fold_backend)
        return (grad_x if need_x else None, grad_w1, grad_log_scale1, grad_b1.to(b1.dtype), grad_w2, grad_log_scale2,
                grad_b2.to(b2.dtype), grad_w3.to(w3_param.dtype), grad_b3.to(b3.dtype), None, None, None)
