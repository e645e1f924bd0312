"""A Glow conditioner's two ActNorms folded into the convolutions before them, ``(W1·e^log_scale1,
W2·e^log_scale2)``, and the gradients of both pairs: one kernel each way for both pairs, instead of two small
PyTorch ops per pair forward and two backward.

A program holds one output channel's row of one weight (programs ``0..O1−1`` the first weight's, the rest the
second's) and loops over the row in blocks; ``∂log_scale[o] = e^log_scale[o]·Σ ∂W_folded[o]·W[o]`` is that
loop's sum, in a fixed order. Conventions: :func:`flowkern.reference.fold_actnorms`.
"""
import triton
import triton.language as tl

from ..._validation import check_fold_actnorms
from ._common import accumulator, check_launchable, empty


@triton.jit
def _fold_row(weight_ptr, log_scale_ptr, out_ptr, o, K, ACC: tl.constexpr, BLOCK: tl.constexpr):
    scale = tl.exp(tl.load(log_scale_ptr + o).to(ACC))
    for start in range(0, K, BLOCK):
        k = start + tl.arange(0, BLOCK)
        inside = k < K
        w = tl.load(weight_ptr + o * K + k, mask=inside, other=0.0).to(ACC)
        tl.store(out_ptr + o * K + k, (w * scale).to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _fold_actnorms_kernel(weight1_ptr, log_scale1_ptr, out1_ptr, O1, K1, weight2_ptr, log_scale2_ptr, out2_ptr, K2,
                          ACC: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    if r < O1:
        _fold_row(weight1_ptr, log_scale1_ptr, out1_ptr, r, K1, ACC, BLOCK)
    else:
        _fold_row(weight2_ptr, log_scale2_ptr, out2_ptr, r - O1, K2, ACC, BLOCK)


@triton.jit
def _fold_row_grad(grad_ptr, weight_ptr, log_scale_ptr, grad_weight_ptr, grad_log_scale_ptr, o, K,
                   ACC: tl.constexpr, BLOCK: tl.constexpr):
    scale = tl.exp(tl.load(log_scale_ptr + o).to(ACC))
    through_scale = tl.zeros((BLOCK,), dtype=ACC)
    for start in range(0, K, BLOCK):
        k = start + tl.arange(0, BLOCK)
        inside = k < K
        g = tl.load(grad_ptr + o * K + k, mask=inside, other=0.0).to(ACC)
        w = tl.load(weight_ptr + o * K + k, mask=inside, other=0.0).to(ACC)
        tl.store(grad_weight_ptr + o * K + k, (g * scale).to(grad_weight_ptr.dtype.element_ty), mask=inside)
        through_scale += g * w
    tl.store(grad_log_scale_ptr + o, (tl.sum(through_scale) * scale).to(grad_log_scale_ptr.dtype.element_ty))


@triton.jit
def _fold_actnorms_grad_kernel(grad1_ptr, weight1_ptr, log_scale1_ptr, grad_weight1_ptr, grad_log_scale1_ptr, O1, K1,
                               grad2_ptr, weight2_ptr, log_scale2_ptr, grad_weight2_ptr, grad_log_scale2_ptr, K2,
                               ACC: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    if r < O1:
        _fold_row_grad(grad1_ptr, weight1_ptr, log_scale1_ptr, grad_weight1_ptr, grad_log_scale1_ptr, r, K1, ACC,
                       BLOCK)
    else:
        _fold_row_grad(grad2_ptr, weight2_ptr, log_scale2_ptr, grad_weight2_ptr, grad_log_scale2_ptr, r - O1, K2,
                       ACC, BLOCK)


def _rows(weight):
    """(output channels, elements per row) of a weight."""
    return weight.shape[0], weight.numel() // max(weight.shape[0], 1)


def _block(*weights):
    return max(16, min(1024, triton.next_power_of_2(max(_rows(w)[1] for w in weights))))


def launch_fold_actnorms(weight1, log_scale1, weight2, log_scale2):
    """(weight_i (O_i, ...), log_scale_i (O_i,), one dtype) → (W1·e^log_scale1, W2·e^log_scale2), contiguous."""
    check_fold_actnorms(weight1, log_scale1, weight2, log_scale2)
    check_launchable(weight1, "fold_actnorms")
    weight1, log_scale1, weight2, log_scale2 = (t.contiguous() for t in (weight1, log_scale1, weight2, log_scale2))
    (o1, k1), (o2, k2) = _rows(weight1), _rows(weight2)
    out1, out2 = empty(weight1.shape, weight1.dtype, weight1.device), empty(weight2.shape, weight2.dtype, weight2.device)
    if o1 + o2:
        _fold_actnorms_kernel[(o1 + o2,)](weight1, log_scale1, out1, o1, k1, weight2, log_scale2, out2, k2,
                                          ACC=accumulator(weight1.dtype), BLOCK=_block(weight1, weight2))
    return out1, out2


def launch_fold_actnorms_backward(grad1, weight1, log_scale1, grad2, weight2, log_scale2):
    """The gradients ``grad_i`` (of the weights' shapes and dtype) of :func:`launch_fold_actnorms`'s outputs →
    ``(∂W1, ∂log_scale1, ∂W2, ∂log_scale2)``."""
    check_fold_actnorms(weight1, log_scale1, weight2, log_scale2, grad1, grad2)
    check_launchable(weight1, "fold_actnorms_backward")
    if grad1.dtype != weight1.dtype or grad2.dtype != weight2.dtype:
        raise TypeError(f"fold_actnorms_backward: expected the gradients in the weights' dtype ({weight1.dtype}), "
                        f"got {grad1.dtype} and {grad2.dtype}")
    # a channels-last convolution's weight gradient is copied here: rows are read as the weights store them
    tensors = [t.contiguous() for t in (grad1, weight1, log_scale1, grad2, weight2, log_scale2)]
    grad1, weight1, log_scale1, grad2, weight2, log_scale2 = tensors
    (o1, k1), (o2, k2) = _rows(weight1), _rows(weight2)
    outs = [empty(t.shape, t.dtype, t.device) for t in (weight1, log_scale1, weight2, log_scale2)]
    if o1 + o2:
        _fold_actnorms_grad_kernel[(o1 + o2,)](grad1, weight1, log_scale1, outs[0], outs[1], o1, k1,
                                               grad2, weight2, log_scale2, outs[2], outs[3], k2,
                                               ACC=accumulator(weight1.dtype), BLOCK=_block(weight1, weight2))
    return tuple(outs)
