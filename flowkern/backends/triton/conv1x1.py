"""The 1×1 convolution as a per-pixel channel mixing, one pass over the activations.

Glow's channel counts are small (12 to 96), so this is memory-bound: a program holds a block of pixels
of one sample with all of its channels and the whole weight, and reads each input element once. The
weight gradient ``Σ_pixels ∂y · xᵀ`` is reduced over pixels by a fixed set of programs whose partial
sums a second kernel adds in a fixed order: deterministic, no atomics. ``W`` from the LU factors and its gradient
with respect to ``L``, ``U`` and ``log_s`` are (C, C) algebra left to PyTorch.
"""
import functools

import torch
import triton
import triton.language as tl

from ...reference._dtypes import compute_dtype
from ..._validation import check_conv1x1, check_grad_out, check_image
from ._common import accumulator, check_launchable, empty, inner_dense

_K_BLOCK = 16  # input channels per step of the matrix product (tl.dot needs at least 16)
_STAGES = 3  # software-pipeline depth of the weight gradient's loop (Triton's default on sm_90)
_SHARED_BUDGET = 192 * 1024  # bytes of its operand tiles, below the 227 KB a block may have on an H100


@triton.jit
def _conv1x1_kernel(
    x_ptr, w_ptr, w_lo_ptr, b_ptr, out_ptr, CI, CO, HW, x_sn, x_sc, w_so, w_si,
    HAS_BIAS: tl.constexpr, SPLIT_W: tl.constexpr, ACC: tl.constexpr, CO_PAD: tl.constexpr,
    K_BLOCK: tl.constexpr, BLOCK: tl.constexpr,
):
    """16-bit x and W go to the tensor cores as they are (their products are exact in the float32
    accumulator); a float32 W with a 16-bit x comes as two 16-bit parts, W = W_hi + W_lo (SPLIT_W), which
    keep 16 bits of its mantissa for bfloat16 and 22 for float16. float32 and float64 run exact FMAs."""
    n = tl.program_id(0).to(tl.int64)  # sample offsets pass 2³¹ elements in large batches
    pix = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = pix < HW
    co = tl.arange(0, CO_PAD)
    acc = tl.zeros((CO_PAD, BLOCK), dtype=ACC)
    for k0 in range(0, CI, K_BLOCK):
        ci = k0 + tl.arange(0, K_BLOCK)
        x = tl.load(x_ptr + n * x_sn + ci[:, None] * x_sc + pix[None, :],
                    mask=(ci < CI)[:, None] & inside[None, :], other=0.0)
        w_at = co[:, None] * w_so + ci[None, :] * w_si
        w_mask = (co < CO)[:, None] & (ci < CI)[None, :]
        w = tl.load(w_ptr + w_at, mask=w_mask, other=0.0)
        if x.dtype.primitive_bitwidth == 16:
            acc += tl.dot(w, x)
            if SPLIT_W:
                acc += tl.dot(tl.load(w_lo_ptr + w_at, mask=w_mask, other=0.0), x)
        else:
            acc += tl.dot(w.to(ACC), x.to(ACC), input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(b_ptr + co, mask=co < CO, other=0.0).to(ACC)[:, None]
    tl.store(out_ptr + n * CO * HW + co[:, None] * HW + pix[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(co < CO)[:, None] & inside[None, :])


@triton.jit
def _conv1x1_weight_grad_kernel(
    g_ptr, x_ptr, gw_ptr, gb_ptr, CI, CO, HW, g_sn, g_sc, x_sn, x_sc, blocks_per_sample, blocks,
    ACC: tl.constexpr, CO_BLOCK: tl.constexpr, CI_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    """Program (i, j) sums ``g · xᵀ`` for output channels block i over pixel blocks j, j + P, j + 2P, …"""
    co = tl.program_id(0) * CO_BLOCK + tl.arange(0, CO_BLOCK)
    ci = tl.arange(0, CI_PAD)
    acc = tl.zeros((CO_BLOCK, CI_PAD), dtype=ACC)
    acc_b = tl.zeros((CO_BLOCK,), dtype=ACC)
    for blk in range(tl.program_id(1), blocks, tl.num_programs(1)):
        n = (blk // blocks_per_sample).to(tl.int64)
        pix = (blk % blocks_per_sample) * BLOCK + tl.arange(0, BLOCK)
        inside = pix < HW
        g = tl.load(g_ptr + n * g_sn + co[:, None] * g_sc + pix[None, :],
                    mask=(co < CO)[:, None] & inside[None, :], other=0.0)
        x = tl.load(x_ptr + n * x_sn + ci[:, None] * x_sc + pix[None, :],
                    mask=(ci < CI)[:, None] & inside[None, :], other=0.0)
        if x.dtype.primitive_bitwidth == 16:  # tensor cores: 16-bit products are exact in float32
            acc += tl.dot(g, tl.trans(x))
        else:
            acc += tl.dot(g.to(ACC), tl.trans(x.to(ACC)), input_precision="ieee")
        acc_b += tl.sum(g.to(ACC), axis=1)
    part = tl.program_id(1)
    tl.store(gw_ptr + part * CO * CI + co[:, None] * CI + ci[None, :], acc,
             mask=(co < CO)[:, None] & (ci < CI)[None, :])
    tl.store(gb_ptr + part * CO + co, acc_b, mask=co < CO)


@triton.jit
def _sum_parts_kernel(gw_ptr, gb_ptr, out_w_ptr, out_b_ptr, WEIGHTS, BIASES, PARTS, BLOCK: tl.constexpr):
    """The second pass of the weight gradient: out[e] = Σ_q part[q, e], the parts added in order, for the
    (PARTS, WEIGHTS) weight partials and the (PARTS, BIASES) bias partials alike."""
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_w, in_b = e < WEIGHTS, e < BIASES
    sum_w = tl.zeros([BLOCK], dtype=gw_ptr.dtype.element_ty)
    sum_b = tl.zeros([BLOCK], dtype=gb_ptr.dtype.element_ty)
    for q in range(0, PARTS):
        sum_w += tl.load(gw_ptr + q * WEIGHTS + e, mask=in_w, other=0.0)
        sum_b += tl.load(gb_ptr + q * BIASES + e, mask=in_b, other=0.0)
    tl.store(out_w_ptr + e, sum_w, mask=in_w)
    tl.store(out_b_ptr + e, sum_b, mask=in_b)


def _operands(weight, dtype):
    """The weight as the kernel takes it for an x of ``dtype``: itself, or for a 16-bit x its two parts
    (W_hi, W_lo) in that dtype (W_lo None when W already has it)."""
    if torch.finfo(dtype).bits != 16 or weight.dtype == dtype:
        return weight, None
    high = weight.to(dtype)
    return high, (weight - high.to(weight.dtype)).to(dtype)


def _pad(channels):
    return max(16, triton.next_power_of_2(channels))


def _pixel_block(hw, channels, dtype):
    # keep the (channels × pixels) accumulator near 32 KB per program (8K float32 values): in registers
    return max(16, min(triton.next_power_of_2(hw), 32768 // (_pad(channels) * compute_dtype(dtype).itemsize), 256))


@functools.lru_cache(maxsize=None)
def _programs_per_device(device):
    if device.type != "cuda":
        return 4
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def launch_conv1x1(x, weight, bias):
    """x (N, C_in, H, W), weight (C_out, C_in), bias (C_out,) or None → (N, C_out, H, W)."""
    check_conv1x1(x, weight, bias, "input")
    check_launchable(x, "conv1x1")
    x = inner_dense(x)
    n, ci, height, width = x.shape
    co = weight.shape[0]
    hw = height * width
    block = _pixel_block(hw, max(ci, co), x.dtype)
    weight, weight_lo = _operands(weight, x.dtype)
    out = empty((n, co, height, width), dtype=x.dtype, device=x.device)
    _conv1x1_kernel[(n, triton.cdiv(hw, block))](
        x, weight, weight if weight_lo is None else weight_lo, weight if bias is None else bias, out, ci, co, hw,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        HAS_BIAS=bias is not None, SPLIT_W=weight_lo is not None, ACC=accumulator(x.dtype), CO_PAD=_pad(co),
        K_BLOCK=_K_BLOCK, BLOCK=block,
    )
    return out


def launch_conv1x1_weight_grad(grad_out, x):
    """(Σ_pixels ∂y·xᵀ (C_out, C_in), Σ_pixels ∂y (C_out,)), both in float32 (float64 for float64)."""
    check_image(x, "input")
    check_image(grad_out, "grad_out")
    check_grad_out(grad_out, x, what=(x.shape[0], grad_out.shape[1], *x.shape[2:]))
    check_launchable(x, "conv1x1 backward")
    grad_out, x = inner_dense(grad_out), inner_dense(x)
    n, ci, height, width = x.shape
    co = grad_out.shape[1]
    hw = height * width
    co_block = min(_pad(co), 32)
    # the (CO_BLOCK + CI_PAD) × BLOCK operand tiles, in every pipeline stage, must fit in shared memory
    tile_budget = _SHARED_BUDGET // (_STAGES * (co_block + _pad(ci)) * x.element_size())
    # 64 pixels, 128 when 16-bit: the same bytes of each row in flight
    block = max(16, min(triton.next_power_of_2(hw), 128 if x.element_size() == 2 else 64,
                        triton.next_power_of_2(tile_budget + 1) // 2))
    blocks_per_sample = triton.cdiv(hw, block)
    blocks = n * blocks_per_sample
    co_blocks = triton.cdiv(co, co_block)
    parts = max(1, min(blocks, _programs_per_device(x.device) // co_blocks))
    ct = compute_dtype(x.dtype)
    grad_w = empty((parts, co, ci), dtype=ct, device=x.device)
    grad_b = empty((parts, co), dtype=ct, device=x.device)
    _conv1x1_weight_grad_kernel[(co_blocks, parts)](
        grad_out, x, grad_w, grad_b, ci, co, hw, grad_out.stride(0), grad_out.stride(1),
        x.stride(0), x.stride(1), blocks_per_sample, blocks,
        ACC=accumulator(x.dtype), CO_BLOCK=co_block, CI_PAD=_pad(ci), BLOCK=block,
        num_stages=_STAGES if _STAGES * (co_block + _pad(ci)) * block * x.element_size() <= _SHARED_BUDGET else 1,
    )
    weight_grad = empty((co, ci), dtype=ct, device=x.device)
    bias_grad = empty((co,), dtype=ct, device=x.device)
    _sum_parts_kernel[(triton.cdiv(max(co * ci, co, 1), 1024),)](
        grad_w, grad_b, weight_grad, bias_grad, co * ci, co, parts, BLOCK=1024, num_warps=4)
    return weight_grad, bias_grad
