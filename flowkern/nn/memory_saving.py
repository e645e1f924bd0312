"""Training by inversion: backpropagation through a chain of flow layers that keeps only its output.

The forward pass runs each layer without recording a graph. The backward pass walks the layers in
reverse: it rebuilds each layer's input from its output with the layer's inverse, runs that one layer
again under autograd and backpropagates through it (log-det included). Activation memory is that of one
layer instead of the whole chain, whatever the chain's length. A coupling evaluates its conditioner once
in the backward pass (:meth:`~flowkern.nn.AffineCoupling.rebuild`), so the whole costs about one forward
pass more than backpropagation.

Each layer is its own autograd node that returns its own parameters' gradients, so autograd accumulates
them (and runs the hooks of ``DistributedDataParallel``) as soon as that layer is done: parameter
gradients are not held for the whole chain either.

Inverses can be ill-conditioned (exploding inverses, Behrmann et al. 2021): then the rebuilt inputs and
the gradients computed from them are wrong. With ``check_reconstruction`` set, the chain also keeps its
input, compares it with the one rebuilt by the backward pass, and warns with the measured error.
"""
import contextlib
import warnings
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch
from torch.autograd.function import once_differentiable

from ..backends import get_backend, use_backend


@runtime_checkable
class Unit(Protocol):
    """What the backward pass rebuilds one at a time: a flow layer, or a view of several run as one
    (:class:`~flowkern.nn.ActNormConv1x1`). A chain lists its units with ``units()``.

    A unit may also define ``rebuild(y) -> (x, leaf, y_again, logdet)`` when it has a cheaper way than
    inverse-then-forward (see :func:`rebuild`); the couplings do.
    """

    def __call__(self, x: torch.Tensor) -> tuple:
        """``(y, logdet (N,))``; must draw no random numbers, since the backward pass runs it again."""

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """The input ``x`` that gives output ``y``."""

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        """Its parameters, whose gradients the unit's autograd node returns."""


class ReconstructionWarning(UserWarning):
    """The input rebuilt by inversion differs from the true input by more than the tolerance."""


def relative_error(got, expected):
    return ((got - expected).norm() / expected.norm().clamp_min(torch.finfo(expected.dtype).tiny)).item()


def rebuild(layer: Unit, y):
    """``(x, leaf, y_again, logdet)``: the unit's input rebuilt from its output ``y``, and its output and
    log-det recomputed under autograd from ``leaf``, a tensor equal to ``x``. Layers with a cheaper way
    than inverse-then-forward define ``rebuild`` themselves (the couplings run their conditioner once)."""
    if hasattr(layer, "rebuild"):
        return layer.rebuild(y)
    with torch.no_grad():
        x = layer.inverse(y)
    leaf = x.detach().requires_grad_()
    y_again, logdet = layer(leaf)
    return x, leaf, y_again, logdet


def _autocast_state():
    """``{device type: dtype}`` of the autocast contexts in force."""
    return {t: torch.get_autocast_dtype(t) for t in ("cpu", "cuda") if torch.is_autocast_enabled(t)}


@contextlib.contextmanager
def _autocast(state):
    """Autocast as ``state`` (from :func:`_autocast_state`) records it, and off elsewhere."""
    with contextlib.ExitStack() as stack:
        for device_type in ("cpu", "cuda"):
            if device_type in state:
                stack.enter_context(torch.autocast(device_type, state[device_type]))
            elif torch.is_autocast_enabled(device_type):
                stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


class _Handoff:
    """One call of a chain: ``outputs[i]`` is the output of unit ``i`` once the backward pass of unit
    ``i + 1`` has rebuilt it (its own input), waiting for the backward pass of unit ``i``."""

    def __init__(self, chain, units):
        self.chain, self.outputs = chain, [None] * units

    def check(self, x, x_true):
        chain = self.chain
        chain.last_reconstruction_error = error = relative_error(x, x_true)
        if not error <= chain.check_reconstruction:  # NaN included
            warnings.warn(
                f"memory-saving backward rebuilt the input of a {len(chain)}-layer chain with relative error "
                f"{error:.3g} (tolerance {chain.check_reconstruction:g}): an inverse is ill-conditioned, so "
                "these gradients are inaccurate; train this part with memory_saving=False or regularise it",
                ReconstructionWarning, stacklevel=3)


class _UnitByInversion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, unit, handoff, index, *params):  # params: so that autograd hands back their gradients
        y, logdet = unit(x)  # grad mode is off in here: no graph is kept
        last = index == len(handoff.outputs) - 1
        # the reconstruction is checked at the first unit the backward pass reaches, where it stops
        check = handoff.chain.check_reconstruction is not None and (index == 0 or not x.requires_grad)
        ctx.save_for_backward(y if last else None, x if check else None)
        ctx.unit, ctx.handoff, ctx.index, ctx.params = unit, handoff, index, params
        # the backward rebuilds the unit as its forward ran: under the same autocast and backend (autograd
        # may run it in another thread, which a use_backend block does not reach)
        ctx.autocast, ctx.backend = _autocast_state(), get_backend()
        return y, logdet

    @staticmethod
    @once_differentiable  # the rebuilt inputs carry no graph: a second derivative would be wrong, so it errs
    def backward(ctx, grad_y, grad_logdet):
        y, x_true = ctx.saved_tensors
        handoff, index = ctx.handoff, ctx.index
        if y is None:  # autograd runs unit index + 1 first: it feeds this unit's gradient
            y, handoff.outputs[index] = handoff.outputs[index], None
        y = y.detach()  # the saved output leads back to this node: rebuilding must not
        needed = ctx.needs_input_grad
        params = [p for p, need in zip(ctx.params, needed[4:]) if need]
        with torch.enable_grad(), use_backend(ctx.backend):
            with _autocast(ctx.autocast):  # the forward again, as it ran; its backward as any backward runs:
                x, leaf, y_again, logdet = rebuild(ctx.unit, y)  # autograd.grad in here would autocast it too
            outputs, grads_out = [y_again], [grad_y]
            if torch.is_tensor(logdet) and logdet.requires_grad:
                outputs.append(logdet)
                grads_out.append(grad_logdet.to(logdet.dtype).expand_as(logdet))
            wrt = [leaf] * needed[0] + params
            grads = list(torch.autograd.grad(outputs, wrt, grads_out, allow_unused=True)) if wrt else []
        if index > 0 and needed[0]:  # else the unit before gets no gradient and is not run backward
            handoff.outputs[index - 1] = x.detach()
        if x_true is not None:
            handoff.check(x, x_true)
        grad_x = grads.pop(0) if needed[0] else None
        param_grads = iter(grads)
        return (grad_x, None, None, None, *(next(param_grads) if need else None for need in needed[4:]))


@torch.compiler.disable(reason="memory_saving=True rebuilds activations in a hand-written backward pass that "
                                "torch.compile does not trace: each chain trained by inversion runs eagerly, between "
                                "compiled graphs (compile with memory_saving=False for one graph)")
def chain_by_inversion(chain, x):
    """``chain(x)`` with activations rebuilt by inversion in the backward pass: ``(y, logdet)``.

    Under ``torch.compile`` it runs eagerly (a graph break; with ``fullgraph=True``, an error that says why)."""
    units = list(chain.units())
    handoff = _Handoff(chain, len(units))
    logdet = 0
    for index, unit in enumerate(units):
        params = [p for p in unit.parameters() if p.requires_grad]
        x, unit_logdet = _UnitByInversion.apply(x, unit, handoff, index, *params)
        logdet = logdet + unit_logdet
    return x, logdet
