"""Training by inversion: backpropagation through a chain of flow layers that keeps only its output.

The forward pass runs the layers without recording a graph. The backward pass walks them in reverse:
it rebuilds each layer's input from its output with the layer's inverse, runs that one layer again
under autograd and backpropagates through it (log-det included). Activation memory is that of one layer
instead of the whole chain, whatever the chain's length. A coupling evaluates its conditioner once in
the backward pass (:meth:`~flowkern.nn.AffineCoupling.rebuild`), so the whole costs about one forward
pass more than backpropagation.

Inverses can be ill-conditioned (exploding inverses, Behrmann et al. 2021): then the rebuilt inputs and
the gradients computed from them are wrong. With ``check_reconstruction`` set, the chain also keeps its
input, compares it with the one rebuilt by the backward pass, and warns with the measured error.
"""
import warnings

import torch


class ReconstructionWarning(UserWarning):
    """The input rebuilt by inversion differs from the true input by more than the tolerance."""


def relative_error(got, expected):
    return ((got - expected).norm() / expected.norm().clamp_min(torch.finfo(expected.dtype).tiny)).item()


def rebuild(layer, y):
    """``(x, leaf, y_again, logdet)``: the layer's input rebuilt from its output ``y``, and its output and
    log-det recomputed under autograd from ``leaf``, a tensor equal to ``x``. Layers with a cheaper way
    than inverse-then-forward define ``rebuild`` themselves (the couplings run their conditioner once)."""
    if hasattr(layer, "rebuild"):
        return layer.rebuild(y)
    with torch.no_grad():
        x = layer.inverse(y)
    leaf = x.detach().requires_grad_()
    y_again, logdet = layer(leaf)
    return x, leaf, y_again, logdet


class _ChainByInversion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, chain, *params):  # params: so that autograd hands back their gradients
        with torch.no_grad():
            y, logdet = chain.run(x)
        ctx.chain = chain
        ctx.save_for_backward(y, x if chain.check_reconstruction is not None else None)
        return y, logdet

    @staticmethod
    def backward(ctx, grad_y, grad_logdet):
        y, x_true = ctx.saved_tensors
        y = y.detach()  # the saved output leads back to this node: rebuilding must not
        chain = ctx.chain
        param_grads = {}
        for layer in reversed(list(chain.units())):
            with torch.enable_grad():
                x, leaf, y_again, layer_logdet = rebuild(layer, y)
                params = [p for p in layer.parameters() if p.requires_grad]
                outputs, grads_out = [y_again], [grad_y]
                if torch.is_tensor(layer_logdet) and layer_logdet.requires_grad:
                    outputs.append(layer_logdet)
                    grads_out.append(grad_logdet.to(layer_logdet.dtype).expand_as(layer_logdet))
                grads = torch.autograd.grad(outputs, [leaf, *params], grads_out, allow_unused=True)
            grad_y, y = grads[0], x.detach()
            for p, g in zip(params, grads[1:]):
                if g is not None:
                    param_grads[p] = g if p not in param_grads else param_grads[p] + g
        if x_true is not None:
            chain.last_reconstruction_error = error = relative_error(y, x_true)
            if not error <= chain.check_reconstruction:  # NaN included
                warnings.warn(
                    f"memory-saving backward rebuilt the input of a {len(chain)}-layer chain with relative error "
                    f"{error:.3g} (tolerance {chain.check_reconstruction:g}): an inverse is ill-conditioned, so "
                    "these gradients are inaccurate; train this part with memory_saving=False or regularise it",
                    ReconstructionWarning, stacklevel=2)
        all_params = chain.trainable_parameters()
        return (grad_y, None, *(param_grads.get(p) for p in all_params))


def chain_by_inversion(chain, x):
    """``chain(x)`` with activations rebuilt by inversion in the backward pass: ``(y, logdet)``."""
    if torch.compiler.is_compiling():
        raise RuntimeError(
            "memory_saving=True rebuilds activations in a hand-written backward pass that torch.compile does "
            "not trace; compile the model with memory_saving=False, or train it eagerly")
    return _ChainByInversion.apply(x, chain, *chain.trainable_parameters())
