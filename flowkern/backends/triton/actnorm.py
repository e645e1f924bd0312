"""ActNorm ``y = x·exp(log_scale) + bias`` in one pass; its backward in one pass with the per-channel sums.

Grid: (sample, channel, block of pixels), each program with its channel's scale and bias as two scalars,
like the coupling kernels. The backward writes each program's partial sums of ``∂log_scale``
and ``∂bias``, and a second kernel sums each channel's in a fixed order into gradients of the parameters'
dtypes: deterministic, no atomics. The log-det ``H·W·Σ log_scale``
touches no activation and stays in PyTorch.
"""
import triton
import triton.language as tl

from ...reference._dtypes import compute_dtype
from ..._validation import check_actnorm, check_grad_out
from ._common import accumulator, check_launchable, empty, inner_dense, pixel_block, warps_for


@triton.jit
def _actnorm_kernel(
    x_ptr, log_scale_ptr, bias_ptr, out_ptr, HW, x_sn, x_sc,
    INVERSE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)  # sample offsets pass 2³¹ elements in large batches
    c = tl.program_id(1)
    pix = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    inside = pix < HW
    log_s = tl.load(log_scale_ptr + c).to(ACC)
    b = tl.load(bias_ptr + c).to(ACC)
    v = tl.load(x_ptr + n * x_sn + c * x_sc + pix, mask=inside).to(ACC)
    out = (v - b) * tl.exp(-log_s) if INVERSE else v * tl.exp(log_s) + b
    tl.store(out_ptr + (n * tl.num_programs(1) + c) * HW + pix, out.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _actnorm_backward_kernel(
    g_ptr, in_ptr, log_scale_ptr, bias_ptr, gin_ptr, glog_ptr, gbias_ptr,
    HW, g_sn, g_sc, in_sn, in_sc,
    INVERSE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """Forward: ∂x = g·s, ∂log_scale = Σ g·(y − b), ∂bias = Σ g.
    Inverse: ∂y = g·s⁻¹, ∂log_scale = −Σ g·x, ∂bias = −Σ g·s⁻¹."""
    n = tl.program_id(0).to(tl.int64)  # sample offsets pass 2³¹ elements in large batches
    c = tl.program_id(1)
    block = tl.program_id(2)
    pix = block * BLOCK + tl.arange(0, BLOCK)
    inside = pix < HW
    log_s = tl.load(log_scale_ptr + c).to(ACC)
    b = tl.load(bias_ptr + c).to(ACC)
    g = tl.load(g_ptr + n * g_sn + c * g_sc + pix, mask=inside, other=0.0).to(ACC)
    v = tl.load(in_ptr + n * in_sn + c * in_sc + pix, mask=inside, other=0.0).to(ACC)
    if INVERSE:
        gin = g * tl.exp(-log_s)
        glog = -gin * (v - b)
        gbias = -gin
    else:
        gin = g * tl.exp(log_s)
        glog = gin * v
        gbias = g
    tl.store(gin_ptr + (n * tl.num_programs(1) + c) * HW + pix, gin.to(gin_ptr.dtype.element_ty), mask=inside)
    # partials laid out (C, N · blocks): each channel's partials are one contiguous row
    slot = c * tl.num_programs(0) * tl.num_programs(2) + n * tl.num_programs(2) + block
    tl.store(glog_ptr + slot, tl.sum(glog, axis=0))
    tl.store(gbias_ptr + slot, tl.sum(gbias, axis=0))


@triton.jit
def _channel_sums_kernel(glog_ptr, gbias_ptr, out_log_ptr, out_bias_ptr, P, BLOCK: tl.constexpr):
    """The second pass of the backward, one program per channel c: row c of each partial buffer (C, P) summed
    in a fixed order, written in the parameter's dtype."""
    row = tl.program_id(0).to(tl.int64) * P
    offsets = tl.arange(0, BLOCK)
    sum_log = tl.zeros([BLOCK], dtype=glog_ptr.dtype.element_ty)
    sum_bias = tl.zeros([BLOCK], dtype=gbias_ptr.dtype.element_ty)
    for start in range(0, P, BLOCK):
        inside = start + offsets < P
        sum_log += tl.load(glog_ptr + row + start + offsets, mask=inside, other=0.0)
        sum_bias += tl.load(gbias_ptr + row + start + offsets, mask=inside, other=0.0)
    c = tl.program_id(0)
    tl.store(out_log_ptr + c, tl.sum(sum_log, axis=0).to(out_log_ptr.dtype.element_ty))
    tl.store(out_bias_ptr + c, tl.sum(sum_bias, axis=0).to(out_bias_ptr.dtype.element_ty))


def _launch_shape(x):
    """Grid, H·W, pixel block and warps: 16 bytes of each plane a thread (at least 4 pixels), so that 16-bit
    inputs keep as many bytes in flight as float32 ones."""
    n, c, height, width = x.shape
    hw = height * width
    block = pixel_block(hw)
    return (n, c, triton.cdiv(hw, block)), hw, block, warps_for(block, max(4, 16 // x.element_size()))


def launch_actnorm(x, log_scale, bias, inverse):
    """ActNorm or its inverse of x (N, C, H, W) → (N, C, H, W) contiguous."""
    check_actnorm(x, log_scale, bias, "input")
    check_launchable(x, "actnorm")
    x, log_scale, bias = inner_dense(x), log_scale.contiguous(), bias.contiguous()
    grid, hw, block, warps = _launch_shape(x)
    out = empty(x.shape, dtype=x.dtype, device=x.device)
    _actnorm_kernel[grid](
        x, log_scale, bias, out, hw, x.stride(0), x.stride(1),
        INVERSE=inverse, ACC=accumulator(x.dtype), BLOCK=block, num_warps=warps,
    )
    return out


def launch_actnorm_backward(grad_out, inp, log_scale, bias, inverse):
    check_actnorm(inp, log_scale, bias, "input")
    check_grad_out(grad_out, inp)
    check_launchable(inp, "actnorm backward")
    grad_out, inp = inner_dense(grad_out), inner_dense(inp)
    log_scale, bias = log_scale.contiguous(), bias.contiguous()
    grid, hw, block, warps = _launch_shape(inp)
    n, c = inp.shape[:2]
    grad_in = empty(inp.shape, dtype=inp.dtype, device=inp.device)
    partial = empty((2, c, n * grid[2]), dtype=compute_dtype(inp.dtype), device=inp.device)
    _actnorm_backward_kernel[grid](
        grad_out, inp, log_scale, bias, grad_in, partial[0], partial[1],
        hw, grad_out.stride(0), grad_out.stride(1), inp.stride(0), inp.stride(1),
        INVERSE=inverse, ACC=accumulator(inp.dtype), BLOCK=block, num_warps=warps,
    )
    grad_log_scale = empty((c,), dtype=log_scale.dtype, device=inp.device)
    grad_bias = empty((c,), dtype=bias.dtype, device=inp.device)
    parts = partial.shape[2]
    _channel_sums_kernel[(c,)](partial[0], partial[1], grad_log_scale, grad_bias, parts,
                               BLOCK=min(1024, triton.next_power_of_2(parts)), num_warps=4)
    return grad_in, grad_log_scale, grad_bias
