"""Affine and additive coupling in one pass over memory, the per-sample log-det reduced in the same pass.

Grid: (sample, channel, block of pixels), so that even a deep level with few pixels has several programs per
SM, each with its loads in flight. A program copies a pass-through channel or transforms one and writes one
partial log-det; the partials of a sample are summed in a fixed order, so the log-det is deterministic. The
checkerboard mask is computed from pixel indices, never read.
"""
import triton
import triton.language as tl

from ..._validation import check_coupling, check_grad_out
from ...reference import h_planes, transformed_range
from ...reference._dtypes import compute_dtype
from ...reference.coupling import SIGMOID_OFFSET
from ._common import accumulator, check_launchable, empty, inner_dense, pixel_block, warps_for

_MASK = {"channel": 0, "checkerboard": 1}
_SIGMOID_OFFSET = tl.constexpr(SIGMOID_OFFSET)
_SCALE = {"sigmoid": 0, "exp": 1, "additive": 2, "reciprocal_sigmoid": 3, "plain_exp": 4, "atan": 5,
          "offset_sigmoid": 6}


@triton.jit
def _log1p(u):
    # log(1 + u) without losing small u: log(w) · u / (w − 1) corrects the rounding of w = 1 + u.
    w = 1.0 + u
    exact = w == 1.0
    return tl.where(exact, u, tl.log(w) * u / tl.where(exact, 1.0, w - 1.0))


@triton.jit
def _tanh(r):
    a = tl.abs(r)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    # Taylor series where 1 − e cancels; the first omitted term is below 1e-15 relative at a = 0.05
    a2 = a * a
    small = a * (1.0 - a2 * (1.0 / 3.0 - a2 * (2.0 / 15.0 - a2 * (17.0 / 315.0 - a2 * (62.0 / 2835.0)))))
    t = tl.where(a < 0.05, small, big)
    return tl.where(r < 0, -t, t)


@triton.jit
def _atan(r):
    """atan(r): 1/|r| above 1 (atan(a) = π/2 − atan(1/a)), then the π/6 shift down to |t| ≤ tan(π/12), where
    15 terms of the odd series reach float64's precision (``atan`` in math.h; Triton's interpreter has no
    libdevice)."""
    a = tl.abs(r)
    big = a > 1.0
    t = tl.where(big, 1.0 / tl.where(big, a, 1.0), a)
    shifted = t > 0.2679491924311227  # tan(π/12)
    t = tl.where(shifted, (t * 1.7320508075688772 - 1.0) / (t + 1.7320508075688772), t)
    t2 = t * t
    p = 1.0 / 29.0
    p = p * t2 - 1.0 / 27.0
    p = p * t2 + 1.0 / 25.0
    p = p * t2 - 1.0 / 23.0
    p = p * t2 + 1.0 / 21.0
    p = p * t2 - 1.0 / 19.0
    p = p * t2 + 1.0 / 17.0
    p = p * t2 - 1.0 / 15.0
    p = p * t2 + 1.0 / 13.0
    p = p * t2 - 1.0 / 11.0
    p = p * t2 + 1.0 / 9.0
    p = p * t2 - 1.0 / 7.0
    p = p * t2 + 1.0 / 5.0
    p = p * t2 - 1.0 / 3.0
    v = t + t * t2 * p
    v = tl.where(shifted, v + 0.5235987755982988, v)  # π/6
    v = tl.where(big, 1.5707963267948966 - v, v)  # π/2
    return tl.where(r < 0, -v, v)


@triton.jit
def _transformed(pix, inside, W, parity, MASK: tl.constexpr):
    """Which of the pixels ``pix`` (those ``inside`` the plane) the transformed channels change: all of
    them under the channel mask, the squares of the given parity under the checkerboard."""
    if MASK == 1:
        active = inside & ((pix // W + pix % W + parity) % 2 == 1)
    else:
        active = inside
    return active


@triton.jit
def _sigmoid_terms(raw):
    """Glow's scale s = sigmoid(z), z = raw + 2, from e = e^{−|z|} and r = 1/(1+e): s = r for z ≥ 0, e·r
    otherwise, so that no exp overflows (``sigmoid_terms`` in csrc/flowkern/math.h)."""
    z = raw + 2.0
    e = tl.exp(-tl.abs(z))
    r = 1.0 / (1.0 + e)
    return z, e, r, tl.where(z >= 0, r, e * r)


@triton.jit
def _scale_and_log(raw, bound, SCALE: tl.constexpr):
    """(s, log s) of each scale of :data:`_SCALE` but the additive (``scale_and_log`` in math.h)."""
    if SCALE == 0:
        z, e, r, s = _sigmoid_terms(raw)
        logs = tl.minimum(z, 0.0) - _log1p(e)
    elif SCALE == 3:
        z, e, r, sig = _sigmoid_terms(raw)
        logs = _log1p(e) - tl.minimum(z, 0.0)
        s = 1.0 / sig
    elif SCALE == 6:
        z, e, r, sig = _sigmoid_terms(raw)
        s = sig + _SIGMOID_OFFSET
        logs = tl.log(s)
    else:
        if SCALE == 1:
            logs = bound * _tanh(raw)
        elif SCALE == 4:
            logs = raw
        else:
            logs = (0.636 * bound) * _atan(raw)
        s = tl.exp(logs)
    return s, logs


@triton.jit
def _scale_and_slope(raw, bound, SCALE: tl.constexpr):
    """(s, d log s / d raw), without a logarithm (``scale_and_slope`` in math.h)."""
    if SCALE == 0:
        z, e, r, s = _sigmoid_terms(raw)
        dlogs = tl.where(z >= 0, e * r, r)  # 1 − sigmoid
    elif SCALE == 3:
        z, e, r, sig = _sigmoid_terms(raw)
        s = 1.0 / sig
        dlogs = -tl.where(z >= 0, e * r, r)
    elif SCALE == 1:
        t = _tanh(raw)
        s = tl.exp(bound * t)
        dlogs = bound * (1.0 - t * t)
    elif SCALE == 4:
        s = tl.exp(raw)
        dlogs = tl.full(raw.shape, 1.0, raw.dtype)
    elif SCALE == 6:
        z, e, r, sig = _sigmoid_terms(raw)
        s = sig + _SIGMOID_OFFSET
        dlogs = sig * tl.where(z >= 0, e * r, r) / s
    else:
        s = tl.exp((0.636 * bound) * _atan(raw))
        dlogs = (0.636 * bound) / (1.0 + raw * raw)
    return s, dlogs


@triton.jit
def _coupling_kernel(
    x_ptr, h_ptr, out_ptr, partial_ptr,
    HW, W, x_sn, x_sc, h_sn, h_sc,
    t_start, n_t, raw_first, shift_first, step, parity, bound: tl.float64,  # a Python float would pass as float32
    MASK: tl.constexpr, SCALE: tl.constexpr, INVERSE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """Program (n, c, j): channel c of sample n on pixel block j, transformed if it is one of the n_t from
    t_start and copied otherwise; its Σ log s goes to partial[n, c, j]. Transformed channel k reads raw from
    plane raw_first + step·k of h and shift from plane shift_first + step·k."""
    if ACC == tl.float32:  # float64 kernels keep the bound as given
        bound = tl.cast(bound, ACC)
    n = tl.program_id(0).to(tl.int64)  # sample offsets pass 2³¹ elements in large batches
    c = tl.program_id(1)
    block = tl.program_id(2)
    k = c - t_start
    pix = block * BLOCK + tl.arange(0, BLOCK)
    inside = pix < HW
    active = _transformed(pix, inside, W, parity, MASK) & (k >= 0) & (k < n_t)
    h_row = h_ptr + n * h_sn + pix
    v = tl.load(x_ptr + n * x_sn + c * x_sc + pix, mask=inside)
    out = v.to(ACC)
    logs_sum = 0.0
    shift = tl.load(h_row + (shift_first + step * k) * h_sc, mask=active, other=0.0).to(ACC)
    if SCALE == 2:
        out = out - shift if INVERSE else out + shift
    else:
        raw = tl.load(h_row + (raw_first + step * k) * h_sc, mask=active, other=0.0).to(ACC)
        s, logs = _scale_and_log(raw, bound, SCALE)
        s = tl.where(active, s, 1.0)
        out = (out - shift) / s if INVERSE else out * s + shift
        logs_sum = tl.sum(tl.where(active, logs, 0.0), axis=0)
    out = tl.where(active, out.to(out_ptr.dtype.element_ty), v)  # passed elements are copied bit for bit
    tl.store(out_ptr + (n * tl.num_programs(1) + c) * HW + pix, out, mask=inside)
    tl.store(partial_ptr + (n * tl.num_programs(1) + c) * tl.num_programs(2) + block, logs_sum)


@triton.jit
def _coupling_backward_kernel(
    g_ptr, gld_ptr, in_ptr, h_ptr, gin_ptr, gh_ptr,
    HW, W, g_sn, g_sc, in_sn, in_sc, h_sn, h_sc, gh_sn,
    t_start, n_t, raw_first, shift_first, step, parity, bound: tl.float64,  # a Python float would pass as float32
    MASK: tl.constexpr, SCALE: tl.constexpr, INVERSE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """Gradients of the op's input and of ``h`` from the gradients of its output and log-det; program
    (n, c, j) as in the forward kernel.

    Forward ``y = x·s + shift``:  ∂x = g·s,  ∂shift = g,  ∂log s = g·x·s + ∂logdet.
    Inverse ``x = (y − shift)/s``:  ∂y = g/s,  ∂shift = −g/s,  ∂log s = ∂logdet − g·x
    (``couple_backward`` in math.h). h's planes as in the forward kernel.
    """
    if ACC == tl.float32:  # float64 kernels keep the bound as given
        bound = tl.cast(bound, ACC)
    n = tl.program_id(0).to(tl.int64)  # sample offsets pass 2³¹ elements in large batches
    c = tl.program_id(1)
    k = c - t_start
    transformed = (k >= 0) & (k < n_t)
    pix = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    inside = pix < HW
    active = _transformed(pix, inside, W, parity, MASK) & transformed
    h_row = h_ptr + n * h_sn + pix
    gh_row = gh_ptr + n * gh_sn + pix
    g_in = tl.load(g_ptr + n * g_sn + c * g_sc + pix, mask=inside)
    g = g_in.to(ACC)
    if SCALE == 2:
        gin = g
        gshift = tl.where(active, -g if INVERSE else g, 0.0)
    else:
        gld = tl.load(gld_ptr + n).to(ACC)
        v = tl.load(in_ptr + n * in_sn + c * in_sc + pix, mask=active, other=0.0).to(ACC)
        raw = tl.load(h_row + (raw_first + step * k) * h_sc, mask=active, other=0.0).to(ACC)
        s, dlogs = _scale_and_slope(raw, bound, SCALE)
        s = tl.where(active, s, 1.0)
        if INVERSE:
            shift = tl.load(h_row + (shift_first + step * k) * h_sc, mask=active, other=0.0).to(ACC)
            gin = g / s
            gshift = -gin
            glogs = gld - gin * (v - shift)
        else:
            gin = g * s
            gshift = g
            glogs = gin * v + gld
        gshift = tl.where(active, gshift, 0.0)
        graw = tl.where(active, glogs * dlogs, 0.0)
        tl.store(gh_row + (raw_first + step * k) * HW, graw.to(gh_ptr.dtype.element_ty), mask=inside & transformed)
    tl.store(gh_row + (shift_first + step * k) * HW, gshift.to(gh_ptr.dtype.element_ty), mask=inside & transformed)
    gin = tl.where(active, gin.to(gin_ptr.dtype.element_ty), g_in)  # passed elements: ∂in = ∂out
    tl.store(gin_ptr + (n * tl.num_programs(1) + c) * HW + pix, gin, mask=inside)


def _layout(c, mask, parity, scale, layout):
    """The kernels' channel arguments: (t_start, n_t, raw_first, shift_first, step)."""
    t_start, n_t = transformed_range(c, mask, parity)
    return (t_start, n_t, *h_planes(n_t, scale, layout))


def _run(x, h, mask, parity, scale, bound, layout, inverse):
    """Coupling or inverse coupling of x (N, C, H, W) → (out (N, C, H, W) contiguous, logdet (N,))."""
    check_coupling(x, h, mask, parity, scale, layout, "input")
    check_launchable(x, "coupling")
    check_launchable(h, "coupling")
    x, h = inner_dense(x), inner_dense(h)
    n, c, height, width = x.shape
    hw = height * width
    block = pixel_block(hw)
    grid = (n, c, triton.cdiv(hw, block))  # one program per sample, channel and block of pixels
    out = empty((n, c, height, width), dtype=x.dtype, device=x.device)
    partial = empty(grid, dtype=compute_dtype(x.dtype), device=x.device)
    _coupling_kernel[grid](
        x, h, out, partial, hw, width, x.stride(0), x.stride(1), h.stride(0), h.stride(1),
        *_layout(c, mask, parity, scale, layout), parity, bound,
        MASK=_MASK[mask], SCALE=_SCALE[scale], INVERSE=inverse, ACC=accumulator(x.dtype), BLOCK=block,
        num_warps=warps_for(block),
    )
    return out, partial.view(n, -1).sum(dim=1)  # in a fixed order: deterministic


def launch_coupling_backward(grad_out, grad_logdet, inp, h, mask, parity, scale, bound, layout, inverse):
    check_coupling(inp, h, mask, parity, scale, layout, "input")
    check_grad_out(grad_out, inp)
    check_grad_out(grad_logdet, inp, what=(inp.shape[0],), name="grad_logdet")
    check_launchable(inp, "coupling backward")
    check_launchable(h, "coupling backward")
    grad_out, inp, h = inner_dense(grad_out), inner_dense(inp), inner_dense(h)
    n, c, height, width = inp.shape
    hw = height * width
    block = pixel_block(hw)
    grad_in = empty((n, c, height, width), dtype=inp.dtype, device=inp.device)
    grad_h = empty(h.shape, dtype=h.dtype, device=h.device)
    _coupling_backward_kernel[(n, c, triton.cdiv(hw, block))](
        grad_out, grad_logdet.contiguous(), inp, h, grad_in, grad_h,
        hw, width, grad_out.stride(0), grad_out.stride(1), inp.stride(0), inp.stride(1),
        h.stride(0), h.stride(1), grad_h.stride(0), *_layout(c, mask, parity, scale, layout), parity, bound,
        MASK=_MASK[mask], SCALE=_SCALE[scale], INVERSE=inverse, ACC=accumulator(inp.dtype), BLOCK=block,
        num_warps=warps_for(block),
    )
    return grad_in, grad_h


def launch_coupling_forward(x, h, mask, parity, scale, bound, layout):
    return _run(x, h, mask, parity, scale, bound, layout, inverse=False)


def launch_coupling_inverse(y, h, mask, parity, scale, bound, layout):
    return _run(y, h, mask, parity, scale, bound, layout, inverse=True)
