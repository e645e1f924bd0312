"""The torch ops a fused backend registers, with the fake implementations and autograd they share.

A fused backend defines twelve ops in the ``flowkern`` namespace under its prefix (``triton_`` for the
Triton kernels, none for the compiled extension) with the schemas below, and kernels for them. This
module adds what does not depend on the kernels: fake implementations (shapes for ``torch.compile``) and
the autograd formulas wiring each op to its backward op.

Each backend module then defines the functions of :data:`flowkern.reference.OPS` over its ops, one
explicit function per op, named as in the layers and the reference:

=====================  ======================================================================
function               op (``torch.ops.flowkern.<prefix><op>``)
=====================  ======================================================================
``coupling_forward``   ``coupling_forward``; its backward ``coupling_backward(inverse=False)``
``coupling_inverse``   ``coupling_inverse``; its backward ``coupling_backward(inverse=True)``
``actnorm_forward``    ``actnorm(inverse=False)``, plus the log-det ``H·W·Σ log_scale``
``actnorm_inverse``    ``actnorm(inverse=True)``, plus the forward map's log-det
``conv1x1``            ``conv1x1``; its backward ``conv1x1`` by ``Wᵀ`` and ``conv1x1_weight_grad``
``folded_lu_weight``   ``folded_lu_weight``; its backward ``folded_lu_weight_backward``
``folded_lu_weight_inverse``  ``folded_lu_weight_inverse`` (no gradient: a differentiated inverse composes the
                       reference's triangular solves)
``fold_actnorms``      ``fold_actnorms``; its backward ``fold_actnorms_backward``
=====================  ======================================================================
"""
import torch

from ..reference._dtypes import compute_dtype

NAMESPACE = "flowkern"

_COUPLING = "(Tensor x, Tensor h, str mask, int parity, str scale, float bound, str layout) -> (Tensor, Tensor)"
SCHEMAS = {
    "coupling_forward": _COUPLING,
    "coupling_inverse": _COUPLING,
    "coupling_backward": "(Tensor grad_out, Tensor grad_logdet, Tensor input, Tensor h, str mask, int parity, "
                         "str scale, float bound, str layout, bool inverse) -> (Tensor, Tensor)",
    "actnorm": "(Tensor x, Tensor log_scale, Tensor bias, bool inverse) -> Tensor",
    "actnorm_backward": "(Tensor grad_out, Tensor input, Tensor log_scale, Tensor bias, bool inverse) "
                        "-> (Tensor, Tensor, Tensor)",
    "conv1x1": "(Tensor x, Tensor weight, Tensor? bias) -> Tensor",
    "conv1x1_weight_grad": "(Tensor grad_out, Tensor x) -> (Tensor, Tensor)",
    "folded_lu_weight": "(Tensor perm, Tensor lower, Tensor upper, Tensor sign, Tensor log_s, Tensor log_scale, "
                        "Tensor bias) -> (Tensor, Tensor, Tensor)",
    "folded_lu_weight_backward": "(Tensor grad_weight, Tensor grad_bias, Tensor grad_per_pixel, Tensor perm, "
                                 "Tensor lower, Tensor upper, Tensor sign, Tensor log_s, Tensor log_scale, "
                                 "Tensor bias, Tensor weight) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    "folded_lu_weight_inverse": "(Tensor perm, Tensor lower, Tensor upper, Tensor sign, Tensor log_s, "
                                "Tensor log_scale, Tensor bias) -> (Tensor, Tensor)",
    "fold_actnorms": "(Tensor weight1, Tensor log_scale1, Tensor weight2, Tensor log_scale2) -> (Tensor, Tensor)",
    "fold_actnorms_backward": "(Tensor grad1, Tensor weight1, Tensor log_scale1, Tensor grad2, Tensor weight2, "
                              "Tensor log_scale2) -> (Tensor, Tensor, Tensor, Tensor)",
}


def _dense_like(t):
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _coupling_fake(x, h, mask, parity, scale, bound, layout):
    return _dense_like(x), x.new_empty(x.shape[0], dtype=compute_dtype(x.dtype))


def _coupling_backward_fake(grad_out, grad_logdet, inp, h, mask, parity, scale, bound, layout, inverse):
    return _dense_like(inp), _dense_like(h)


def _actnorm_fake(x, log_scale, bias, inverse):
    return _dense_like(x)


def _actnorm_backward_fake(grad_out, inp, log_scale, bias, inverse):
    return _dense_like(inp), torch.empty_like(log_scale), torch.empty_like(bias)


def _conv1x1_fake(x, weight, bias):
    return x.new_empty((x.shape[0], weight.shape[0], x.shape[2], x.shape[3]))


def _conv1x1_weight_grad_fake(grad_out, x):
    ct = compute_dtype(x.dtype)
    return x.new_empty((grad_out.shape[1], x.shape[1]), dtype=ct), x.new_empty(grad_out.shape[1], dtype=ct)


def _folded_lu_weight_fake(perm, lower, upper, sign, log_s, log_scale, bias):
    return torch.empty_like(perm), torch.empty_like(log_s), perm.new_empty(())


def _folded_lu_weight_backward_fake(grad_weight, grad_bias, grad_per_pixel, perm, lower, upper, sign, log_s,
                                    log_scale, bias, weight):
    return torch.empty_like(perm), torch.empty_like(perm), *(torch.empty_like(log_s) for _ in range(3))


def _fold_actnorms_fake(weight1, log_scale1, weight2, log_scale2):
    return _dense_like(weight1), _dense_like(weight2)


def _fold_actnorms_backward_fake(grad1, weight1, log_scale1, grad2, weight2, log_scale2):
    return _dense_like(weight1), torch.empty_like(log_scale1), _dense_like(weight2), torch.empty_like(log_scale2)


_FAKES = {
    "coupling_forward": _coupling_fake,
    "coupling_inverse": _coupling_fake,
    "coupling_backward": _coupling_backward_fake,
    "actnorm": _actnorm_fake,
    "actnorm_backward": _actnorm_backward_fake,
    "conv1x1": _conv1x1_fake,
    "conv1x1_weight_grad": _conv1x1_weight_grad_fake,
    "folded_lu_weight": _folded_lu_weight_fake,
    "folded_lu_weight_backward": _folded_lu_weight_backward_fake,
    "folded_lu_weight_inverse": lambda perm, *factors: (torch.empty_like(perm), torch.empty_like(factors[-1])),
    "fold_actnorms": _fold_actnorms_fake,
    "fold_actnorms_backward": _fold_actnorms_backward_fake,
}


def _coupling_autograd(ops, inverse):
    def setup_context(ctx, inputs, output):
        x, h, *options = inputs
        ctx.save_for_backward(x, h)
        ctx.options = options

    def backward(ctx, grad_out, grad_logdet):
        x, h = ctx.saved_tensors
        if grad_logdet is None:
            grad_logdet = x.new_zeros(x.shape[0], dtype=compute_dtype(x.dtype))
        grad_x, grad_h = ops.coupling_backward(grad_out, grad_logdet, x, h, *ctx.options, inverse)
        return grad_x, grad_h, *(None for _ in ctx.options)
    return backward, setup_context


def _actnorm_autograd(ops):
    def setup_context(ctx, inputs, output):
        x, log_scale, bias, inverse = inputs
        ctx.save_for_backward(x, log_scale, bias)
        ctx.inverse = inverse

    def backward(ctx, grad_out):
        x, log_scale, bias = ctx.saved_tensors
        return (*ops.actnorm_backward(grad_out, x, log_scale, bias, ctx.inverse), None)
    return backward, setup_context


def _conv1x1_autograd(ops):
    def setup_context(ctx, inputs, output):
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.bias_dtype = None if bias is None else bias.dtype

    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        grad_x = grad_w = grad_b = None
        if need_x:
            grad_x = ops.conv1x1(grad_out, weight.t(), None)  # Wᵀ·∂y: the same kernel
        if need_w or need_b:
            grad_w, grad_b = ops.conv1x1_weight_grad(grad_out, x)
            grad_w = grad_w.to(weight.dtype) if need_w else None
            grad_b = grad_b.to(ctx.bias_dtype) if need_b else None
        return grad_x, grad_w, grad_b
    return backward, setup_context


def _folded_lu_weight_autograd(ops):
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs, output[0])

    def backward(ctx, grad_weight, grad_bias, grad_per_pixel):
        *inputs, weight = ctx.saved_tensors
        # an output no loss reached has no gradient: zeros, so the kernels need no variants
        grads = [torch.zeros_like(like) if g is None else g
                 for g, like in ((grad_weight, weight), (grad_bias, inputs[6]), (grad_per_pixel, weight.new_empty(())))]
        lower, upper, log_s, log_scale, bias = ops.folded_lu_weight_backward(*grads, *inputs, weight)
        return None, lower, upper, None, log_s, log_scale, bias
    return backward, setup_context


def _fold_actnorms_autograd(ops):
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward(ctx, grad1, grad2):
        weight1, log_scale1, weight2, log_scale2 = ctx.saved_tensors
        grad1 = torch.zeros_like(weight1) if grad1 is None else grad1.to(weight1.dtype)
        grad2 = torch.zeros_like(weight2) if grad2 is None else grad2.to(weight2.dtype)
        return ops.fold_actnorms_backward(grad1, weight1, log_scale1, grad2, weight2, log_scale2)
    return backward, setup_context


class FusedOps:
    """The ops registered under ``prefix``, called with the signatures of :mod:`flowkern.reference`."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        for name in SCHEMAS:
            setattr(self, name, getattr(getattr(torch.ops, NAMESPACE), prefix + name).default)

    def register_fakes_and_autograd(self):
        for name, fake in _FAKES.items():
            torch.library.register_fake(f"{NAMESPACE}::{self.prefix}{name}", fake)
        autograd = {
            "coupling_forward": _coupling_autograd(self, inverse=False),
            "coupling_inverse": _coupling_autograd(self, inverse=True),
            "actnorm": _actnorm_autograd(self),
            "conv1x1": _conv1x1_autograd(self),
            "folded_lu_weight": _folded_lu_weight_autograd(self),
            "fold_actnorms": _fold_actnorms_autograd(self),
        }
        for name, (backward, setup_context) in autograd.items():
            torch.library.register_autograd(f"{NAMESPACE}::{self.prefix}{name}", backward,
                                            setup_context=setup_context)
        return self
