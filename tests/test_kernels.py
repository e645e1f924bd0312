"""Every fused backend against the reference: each op and variant, dtypes, layouts, gradients, determinism."""
import pytest
import torch

from flowkern import reference
from flowkern.backends._ops import SCHEMAS
from flowkern import backends
from fused_backends import DEVICE, FUSED_BACKENDS, LAYOUTS, assert_close, load_backend, make, value_and_grads


@pytest.fixture(params=FUSED_BACKENDS)
def fused(request, monkeypatch):
    return load_backend(request.param, monkeypatch)


def coupling_inputs(mask, parity, scale, dtype, layout, shape=(3, 5, 7, 5)):
    n, c, h, w = shape
    x = make(shape, dtype, layout)
    h_channels = reference.conditioner_channels(c, mask, parity, scale)[1]
    return x, make((n, h_channels, h, w), dtype, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("direction", ["forward", "inverse"])
@pytest.mark.parametrize("scale", reference.SCALES)
@pytest.mark.parametrize("mask,parity", [("channel", 0), ("channel", 1), ("checkerboard", 0), ("checkerboard", 1)])
def test_coupling_matches_reference(fused, mask, parity, scale, direction, dtype, layout):
    x, h = coupling_inputs(mask, parity, scale, dtype, layout)
    check_coupling_against_reference(fused, f"coupling_{direction}", x, h, mask, parity, scale)


@pytest.mark.parametrize("h_layout", ["shift_halves", "interleaved"])
@pytest.mark.parametrize("direction", ["forward", "inverse"])
@pytest.mark.parametrize("scale", ["sigmoid", "reciprocal_sigmoid", "plain_exp", "atan"])
@pytest.mark.parametrize("mask,parity", [("channel", 1), ("checkerboard", 0)])
def test_coupling_h_layouts_match_reference(fused, mask, parity, scale, direction, h_layout):
    """The orders of raw and shift in h other than flowkern's halves: nflows' and normflows'."""
    x, h = coupling_inputs(mask, parity, scale, torch.float32, "channel-slice")
    check_coupling_against_reference(fused, f"coupling_{direction}", x, h, mask, parity, scale, h_layout)


def check_coupling_against_reference(fused, op, x, h, mask, parity, scale, h_layout="halves"):
    """Outputs, log-det and the gradients of x and h from random upstream gradients, fused vs reference."""
    upstream = (torch.randn(x.shape), torch.randn(x.shape[0]))

    def run(module):
        return value_and_grads(lambda a, b: getattr(module, op)(a, b, mask, parity, scale, 2.0, h_layout), (x, h),
                               upstream)

    got, got_grads = run(fused)
    expected, expected_grads = run(reference)
    assert got[0].dtype == x.dtype and got[1].dtype == torch.float32
    assert_close(got, expected, x.dtype, f"{op} outputs")
    assert_close(got_grads, expected_grads, x.dtype, f"{op} gradients (x, h)")


@pytest.mark.parametrize("upstream", ["both", "y only", "logdet only"])
@pytest.mark.parametrize("mask,parity,scale", [("channel", 1, "sigmoid"), ("checkerboard", 0, "exp"),
                                               ("channel", 0, "additive")])
def test_coupling_backward_is_the_gradient_of_coupling_forward(fused, mask, parity, scale, upstream):
    """Each backend's coupling_backward (what a node holding the coupling calls), the reference's among them,
    against autograd through the reference's forward; an upstream gradient may be None."""
    x, h = coupling_inputs(mask, parity, scale, torch.float64, "channel-slice")
    grad_y = None if upstream == "logdet only" else torch.randn(x.shape, dtype=torch.float64)
    grad_logdet = None if upstream == "y only" else torch.randn(x.shape[0], dtype=torch.float64)
    leaves = [x.detach().requires_grad_(), h.detach().requires_grad_()]
    y, logdet = reference.coupling_forward(*leaves, mask, parity, scale, 2.0)
    terms = [(o * g).sum() for o, g in ((y, grad_y), (logdet, grad_logdet)) if g is not None and o.requires_grad]
    expected = torch.autograd.grad(sum(terms), leaves, allow_unused=True) if terms else (None, None)
    expected = [torch.zeros_like(t) if g is None else g for g, t in zip(expected, leaves)]
    for module in (fused, reference):
        got = module.coupling_backward(grad_y, grad_logdet, x, h, mask, parity, scale, 2.0)
        assert_close(got, expected, torch.float64, f"{module.__name__} coupling_backward")


def test_coupling_log_det_is_exact_on_large_scales(fused):
    # raw far into both tails of the sigmoid and of tanh: the fused log-sigmoid and tanh stay accurate
    x, h = coupling_inputs("channel", 0, "sigmoid", torch.float64, "contiguous", (2, 4, 3, 3))
    h = h * 30
    for scale in ("sigmoid", "reciprocal_sigmoid", "exp", "plain_exp", "atan"):
        got = fused.coupling_forward(x, h, "channel", 0, scale, 2.0)
        expected = reference.coupling_forward(x, h, "channel", 0, scale, 2.0)
        assert_close(got, expected, torch.float64, scale)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_actnorm_matches_reference(fused, direction, dtype, layout):
    x = make((3, 5, 7, 5), dtype, layout)
    log_scale, bias = 0.5 * torch.randn(5), torch.randn(5)
    op = f"actnorm_{direction}"
    upstream = (torch.randn(x.shape), torch.randn(x.shape[0]))
    got, got_grads = value_and_grads(getattr(fused, op), (x, log_scale, bias), upstream)
    expected, expected_grads = value_and_grads(getattr(reference, op), (x, log_scale, bias), upstream)
    assert_close(got, expected, dtype, f"{op} outputs")
    # the per-channel sums run over 175 products of O(1): float32 rounding grows with that count
    tolerance_dtype = torch.float16 if dtype == torch.float16 else torch.float32
    assert_close(got_grads, expected_grads, tolerance_dtype, f"{op} gradients (x, log_scale, bias)")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("c_in,c_out,with_bias", [(5, 5, False), (5, 7, True), (20, 20, True), (48, 40, False)])
def test_conv1x1_matches_reference(fused, c_in, c_out, with_bias, dtype, layout):
    x = make((3, c_in, 7, 5), dtype, layout)
    weight = torch.randn(c_out, c_in) / c_in ** 0.5
    bias = torch.randn(c_out) if with_bias else None
    upstream = (torch.randn(3, c_out, 7, 5),)
    got, got_grads = value_and_grads(fused.conv1x1, (x, weight, bias), upstream)
    expected, expected_grads = value_and_grads(reference.conv1x1, (x, weight, bias), upstream)
    assert_close(got, expected, dtype, "conv1x1 output")
    tolerance_dtype = torch.float16 if dtype == torch.float16 else torch.float32
    assert_close(got_grads, expected_grads, tolerance_dtype, "conv1x1 gradients (x, weight, bias)")


@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_actnorm_and_conv1x1_take_parameters_of_x_dtype(fused, direction):
    """A float16 model (``model.half()``): parameters and weight in float16 too, read as they are; the
    parameter gradients come back in float16."""
    x = make((3, 6, 9, 7), torch.float16, "channel-slice")
    log_scale, bias = (0.5 * torch.randn(6)).half(), torch.randn(6).half()
    weight, conv_bias = (torch.randn(5, 6) / 6 ** 0.5).half(), torch.randn(5).half()
    op = f"actnorm_{direction}"
    for name, args, upstream in [(op, (x, log_scale, bias), (torch.randn(x.shape), torch.randn(3))),
                                 ("conv1x1", (x, weight, conv_bias), (torch.randn(3, 5, 9, 7),))]:
        got, got_grads = value_and_grads(getattr(fused, name), args, upstream)
        expected, expected_grads = value_and_grads(getattr(reference, name), args, upstream)
        assert [g.dtype for g in got_grads] == [torch.float16] * 3, name
        assert_close(got, expected, torch.float16, f"{name} outputs")
        assert_close(got_grads, expected_grads, torch.float16, f"{name} gradients")


def test_conv1x1_of_a_float16_x_keeps_a_float32_weight_exact(fused):
    """A float32 weight with a float16 x (a float32 LU weight in a float16 model): the output is the exact
    product rounded once to float16, as if the weight had not been rounded to 16 bits."""
    x, weight = make((2, 48, 8, 8), torch.float16), torch.randn(48, 48) / 48 ** 0.5
    exact = torch.einsum("oc,nchw->nohw", weight.double(), x.double())
    scale = torch.einsum("oc,nchw->nohw", weight.double().abs(), x.double().abs())
    eps = torch.finfo(torch.float16).eps
    error = (fused.conv1x1(x, weight).double() - exact).abs()
    assert (error <= 0.5 * eps * exact.abs() + 0.01 * eps * scale).all(), (error / (eps * scale)).max()


def test_conv1x1_transposed_weight_view(fused):
    x, weight = make((2, 6, 3, 5)), torch.randn(6, 6)
    assert_close([fused.conv1x1(x, weight.t())], [reference.conv1x1(x, weight.t())], torch.float32, "W.t()")


def lu_inputs(c, dtype, perm="permutation", strided=False):
    """Fresh LU factors and ActNorm parameters of C channels: (perm, lower, upper, sign, log_s, log_scale, bias).
    ``perm="general"``: any matrix, which the kernels must multiply as exactly as a permutation; ``strided``: every
    factor a non-contiguous view."""
    def fresh(*size, scale=1.0):
        t = scale * torch.randn(*size, 2, dtype=torch.float64)[..., 1]  # a view with stride 2
        return (t if strided else t.contiguous()).to(dtype)
    p = torch.eye(c, dtype=torch.float64)[torch.randperm(c)] if perm == "permutation" else torch.randn(c, c,
                                                                                                      dtype=torch.float64)
    p = p.t().contiguous().t() if strided else p  # column-major
    return [p.to(dtype), fresh(c, c, scale=0.5), fresh(c, c, scale=0.5), fresh(c).sign(), fresh(c, scale=0.3),
            fresh(c, scale=0.3), fresh(c)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("c,perm,strided", [(1, "permutation", False), (6, "permutation", True), (13, "general", False),
                                             (40, "permutation", False), (17, "general", True)])
def test_folded_lu_weight_matches_reference(fused, c, perm, strided, dtype):
    """Weight, bias and per-pixel log-det, and the gradients of lower, upper, log_s, log_scale and bias from random
    upstream gradients of all three outputs; lower and upper are read on their own side of the diagonal only."""
    inputs = lu_inputs(c, dtype, perm, strided)
    upstream = (torch.randn(c, c, dtype=dtype), torch.randn(c, dtype=dtype), torch.randn((), dtype=dtype))

    def run(module):
        leaves = [t.detach().clone().requires_grad_(i in (1, 2, 4, 5, 6)) for i, t in enumerate(inputs)]
        outputs = module.folded_lu_weight(*leaves)
        torch.autograd.backward(outputs, upstream)
        return list(outputs), [leaves[i].grad for i in (1, 2, 4, 5, 6)]
    (got, got_grads), (expected, expected_grads) = run(fused), run(reference)
    assert [t.dtype for t in got + got_grads] == [dtype] * 8
    assert_close(got, expected, dtype, "folded_lu_weight outputs")
    assert_close(got_grads, expected_grads, dtype, "folded_lu_weight gradients (lower, upper, log_s, log_scale, bias)")
    assert not got_grads[0].triu().any() and not got_grads[1].tril().any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("c,perm,strided", [(1, "permutation", False), (7, "permutation", True), (40, "permutation", False),
                                             (9, "general", True)])
def test_folded_lu_weight_inverse_matches_reference_and_inverts(fused, c, perm, strided, dtype):
    """The inverse map's weight and bias against the reference's triangular solves (which take P⁻¹ = Pᵀ, as the
    kernels do, whatever P is), and for a permutation P, composed with the forward map, the identity."""
    inputs = lu_inputs(c, dtype, perm, strided)
    # triangular factors as a perturbed rotation has them (InvConv1x1's initialisation): random ones of C = 40 have
    # inverses of entries near 10⁴, whose float32 solves differ by their order of operations
    rotation = torch.linalg.qr(torch.randn(c, c, dtype=torch.float64))[0]
    _, lower, upper = torch.linalg.lu(rotation + 0.05 * torch.randn(c, c, dtype=torch.float64))
    inputs[1].copy_(lower)
    inputs[2].copy_(upper)
    inputs[3].copy_(upper.diagonal().sign())
    inputs[4].copy_(upper.diagonal().abs().log())
    got, expected = fused.folded_lu_weight_inverse(*inputs), reference.folded_lu_weight_inverse(*inputs)
    assert [t.dtype for t in got] == [dtype] * 2
    assert_close(got, expected, dtype, "folded_lu_weight_inverse")
    if perm != "permutation":
        return
    weight, bias, _ = reference.folded_lu_weight(*inputs)
    inverse, inverse_bias = got
    identity = torch.eye(c, dtype=dtype)
    assert_close([inverse @ weight, inverse @ bias + inverse_bias], [identity, torch.zeros(c, dtype=dtype)],
                 torch.float16 if dtype == torch.float32 else torch.float64, "inverse ∘ forward")


def test_folded_lu_weight_gradcheck(fused):
    inputs = lu_inputs(5, torch.float64)
    for i in (1, 2, 4, 5, 6):
        inputs[i].requires_grad_()
    assert torch.autograd.gradcheck(fused.folded_lu_weight, inputs)


def test_folded_lu_weight_of_low_precision_factors_is_assembled_in_float32(fused, monkeypatch):
    """bfloat16 factors under autocast (functional.folded_lu_weight): assembled in float32 by the backend, which
    autocast does not lower, and their gradients come back in bfloat16."""
    import flowkern
    inputs = [t.to(torch.bfloat16).requires_grad_(i in (1, 2, 4, 5, 6)) for i, t in enumerate(lu_inputs(5, torch.float32))]
    name = next(n for n in FUSED_BACKENDS if backends._load(n) is fused)
    with flowkern.use_backend(name), torch.autocast(torch.device(DEVICE).type, torch.bfloat16):
        outputs = flowkern.functional.folded_lu_weight(*inputs)
    expected = reference.folded_lu_weight(*(t.detach().float() for t in inputs))
    assert [t.dtype for t in outputs] == [torch.float32] * 3
    assert_close(outputs, expected, torch.float32, "bfloat16 factors")
    sum(o.sum() for o in outputs).backward()
    assert all(inputs[i].grad.dtype == torch.bfloat16 for i in (1, 2, 4, 5, 6))


def fold_inputs(dtype, layout="contiguous", hidden=7, c_in=5):
    """A Glow conditioner's (w1 (hidden, c_in, 3, 3), log_scale1, w2 (hidden, hidden, 1, 1), log_scale2) in
    ``layout`` ("channels-last" weights, or "sliced": views into larger tensors)."""
    w1, w2 = make((hidden, c_in, 3, 3), dtype, "channels-last" if layout == "channels-last" else "contiguous"), \
        make((hidden, hidden, 1, 1), dtype)
    log_scales = [(0.3 * torch.randn(2 * hidden + 2, dtype=torch.float64)).to(dtype) for _ in range(2)]
    if layout == "sliced":
        w1 = make((hidden + 1, c_in + 2, 3, 3), dtype)[1:, 1:c_in + 1]
        return w1, log_scales[0][::2][:hidden], w2, log_scales[1][2:hidden + 2]
    return w1, log_scales[0][:hidden], w2, log_scales[1][:hidden]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("layout,hidden,c_in", [("contiguous", 7, 5), ("sliced", 13, 3), ("channels-last", 6, 4),
                                                ("contiguous", 1, 1), ("contiguous", 40, 129)])
def test_fold_actnorms_matches_reference(fused, layout, hidden, c_in, dtype):
    """Both folded weights, and the backward op's four gradients from random upstream gradients (a channels-last
    convolution's weight gradient among them), against the reference's autograd."""
    inputs = fold_inputs(dtype, layout, hidden, c_in)
    got, expected = fused.fold_actnorms(*inputs), reference.fold_actnorms(*inputs)
    assert [t.dtype for t in got] == [dtype] * 2
    assert_close(got, expected, dtype, "fold_actnorms")
    grads = make(tuple(inputs[0].shape), dtype, "channels-last"), make(tuple(inputs[2].shape), dtype)
    w1, log_scale1, w2, log_scale2 = inputs
    got = fused.fold_actnorms_backward(grads[0], w1, log_scale1, grads[1], w2, log_scale2)
    expected = reference.fold_actnorms_backward(grads[0], w1, log_scale1, grads[1], w2, log_scale2)
    assert [t.dtype for t in got] == [dtype] * 4 and [t.shape for t in got] == [t.shape for t in inputs]
    assert_close(got, expected, dtype, "fold_actnorms_backward (w1, log_scale1, w2, log_scale2)")
    # and the op's autograd gives the same
    leaves = [t.detach().requires_grad_() for t in inputs]
    through_autograd = torch.autograd.grad(fused.fold_actnorms(*leaves), leaves, grads)
    assert_close(through_autograd, expected, dtype, "gradients of fold_actnorms through autograd")


def test_fold_actnorms_gradcheck_and_determinism(fused):
    inputs = [t.requires_grad_() for t in fold_inputs(torch.float64, hidden=4, c_in=3)]
    assert torch.autograd.gradcheck(fused.fold_actnorms, inputs)
    inputs = [t.detach().float() for t in inputs]
    grads = torch.randn(inputs[0].shape), torch.randn(inputs[2].shape)
    first, second = (fused.fold_actnorms_backward(grads[0], inputs[0], inputs[1], grads[1], inputs[2], inputs[3])
                     for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


GRADCHECK_CASES = [
    ("coupling_forward", ("channel", 1, "sigmoid", 2.0)),
    ("coupling_inverse", ("channel", 0, "exp", 1.5)),
    ("coupling_forward", ("checkerboard", 0, "exp", 2.0)),
    ("coupling_inverse", ("checkerboard", 1, "sigmoid", 2.0)),
    ("coupling_inverse", ("channel", 1, "additive", 2.0)),
]


@pytest.mark.parametrize("op,options", GRADCHECK_CASES)
def test_coupling_gradcheck(fused, op, options):
    mask, parity, scale, bound = options
    x, h = coupling_inputs(mask, parity, scale, torch.float64, "contiguous", (2, 3, 3, 2))
    x.requires_grad_()
    h.requires_grad_()
    fn = getattr(fused, op)
    assert torch.autograd.gradcheck(lambda a, b: fn(a, b, mask, parity, scale, bound), (x, h), fast_mode=True)


def test_actnorm_and_conv1x1_gradcheck(fused):
    x = make((2, 3, 3, 2), torch.float64).requires_grad_()
    log_scale = torch.randn(3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    bias4 = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fused.actnorm_forward, (x, log_scale, bias), fast_mode=True)
    assert torch.autograd.gradcheck(fused.actnorm_inverse, (x, log_scale, bias), fast_mode=True)
    assert torch.autograd.gradcheck(fused.conv1x1, (x, weight, bias4), fast_mode=True)


@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_float64_stays_float64(fused, direction):
    """Outputs, log-dets and gradients in float64, the bound too: 0.3 is not a float32 number."""
    op = f"coupling_{direction}"
    x, h = coupling_inputs("checkerboard", 1, "exp", torch.float64, "channel-slice")
    upstream = [torch.randn_like(x), torch.randn(x.shape[0], dtype=torch.float64)]

    def run(module):
        return value_and_grads(lambda a, b: getattr(module, op)(a, b, "checkerboard", 1, "exp", 0.3), [x, h], upstream)
    got, expected = run(fused), run(reference)
    assert all(t.dtype == torch.float64 for t in (*got[0], *got[1]))
    assert_close([*got[0], *got[1]], [*expected[0], *expected[1]], torch.float64, op)


def test_log_det_and_outputs_are_bitwise_deterministic(fused):
    x, h = coupling_inputs("channel", 0, "sigmoid", torch.float32, "contiguous", (2, 6, 33, 35))
    first = fused.coupling_forward(x, h)
    second = fused.coupling_forward(x, h)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    weight, upstream = torch.randn(6, 6), torch.randn(2, 6, 33, 35)
    grads = [value_and_grads(fused.conv1x1, (x, weight, None), (upstream,))[1] for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_round_trip_through_fused_ops(fused):
    x, h = coupling_inputs("channel", 1, "sigmoid", torch.float32, "channel-slice", (2, 7, 9, 4))
    y, logdet = fused.coupling_forward(x, h, "channel", 1)
    x_back, logdet_back = fused.coupling_inverse(y, h, "channel", 1)
    torch.testing.assert_close(x_back, x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logdet_back, logdet, rtol=1e-6, atol=1e-5)


def _opcheck_samples(ops):
    """(op overload, args) for every torch op a fused backend registers, inputs requiring grad where they can."""
    x = make((2, 5, 3, 5)).requires_grad_()
    h = make((2, 4, 3, 5)).requires_grad_()  # channel mask, parity 0, sigmoid: 2 transformed channels
    h_odd = make((2, 6, 3, 5)).requires_grad_()  # channel mask, parity 1: 3 transformed channels
    h_board = make((2, 10, 3, 5)).requires_grad_()
    log_scale, bias = torch.randn(5, requires_grad=True), torch.randn(5, requires_grad=True)
    weight, bias7 = torch.randn(7, 5, requires_grad=True), torch.randn(7, requires_grad=True)
    grad_y, grad_logdet = torch.randn(2, 5, 3, 5), torch.randn(2)
    return [
        (ops.coupling_forward, (x, h, "channel", 0, "sigmoid", 2.0, "halves")),
        (ops.coupling_forward, (x, h, "channel", 0, "atan", 2.0, "interleaved")),
        (ops.coupling_forward, (x, h.detach().half().requires_grad_(), "channel", 0, "sigmoid", 2.0, "halves")),
        (ops.coupling_forward, (x, h[:, :2], "channel", 0, "additive", 2.0, "halves")),
        (ops.coupling_inverse, (x, h_board, "checkerboard", 1, "exp", 1.5, "halves")),
        (ops.coupling_inverse, (x, h_board, "checkerboard", 1, "reciprocal_sigmoid", 1.5, "shift_halves")),
        (ops.coupling_backward, (grad_y, grad_logdet, x.detach(), h_odd.detach(), "channel", 1, "sigmoid", 2.0, "halves",
                                  True)),
        (ops.coupling_backward, (grad_y, grad_logdet, x.detach(), h_odd.detach(), "channel", 1, "plain_exp", 2.0,
                                  "interleaved", False)),
        (ops.actnorm, (x, log_scale, bias, False)),
        (ops.actnorm_backward, (grad_y, x.detach(), log_scale.detach(), bias.detach(), True)),
        (ops.conv1x1, (x, weight, bias7)),
        (ops.conv1x1, (x, weight, None)),
        (ops.conv1x1_weight_grad, (torch.randn(2, 7, 3, 5), x.detach())),
        *[(ops.folded_lu_weight, tuple(t.requires_grad_(i in (1, 2, 4, 5, 6)) for i, t in enumerate(lu_inputs(c, dtype))))
          for c, dtype in ((5, torch.float32), (3, torch.float64))],
        (ops.folded_lu_weight_inverse, tuple(lu_inputs(6, torch.float32))),
        (ops.folded_lu_weight_inverse, tuple(lu_inputs(3, torch.float64))),
        (ops.folded_lu_weight_backward, (torch.randn(4, 4), torch.randn(4), torch.randn(()), *lu_inputs(4, torch.float32),
                                         torch.randn(4, 4))),
        (ops.fold_actnorms, tuple(t.requires_grad_() for t in fold_inputs(torch.float32))),
        (ops.fold_actnorms, tuple(t.requires_grad_() for t in fold_inputs(torch.float64, "sliced", 3, 2))),
        (ops.fold_actnorms_backward, (torch.randn(7, 5, 3, 3), *fold_inputs(torch.float32)[:2], torch.randn(7, 7, 1, 1),
                                      *fold_inputs(torch.float32)[2:])),
    ]


def test_opcheck(fused):
    """Every op, several samples each (a float16 h with a float32 x among them), with inputs that require
    gradients and without."""
    samples = _opcheck_samples(fused.ops)
    assert {op for op, _ in samples} == {getattr(fused.ops, name) for name in SCHEMAS}, "every op is checked"
    for op, args in samples:
        torch.library.opcheck(op, args)
        torch.library.opcheck(op, tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args))


BFLOAT16_CASES = [("channel", 0, "sigmoid"), ("checkerboard", 1, "exp"), ("channel", 1, "additive")]


def check_bfloat16(fused, mask, parity, scale):
    """bfloat16 in, float32 arithmetic and log-det: the couplings with gradients, ActNorm, the 1×1 conv and
    its weight gradient (float32 sums of exact bfloat16 products) against the reference."""
    dtype = torch.bfloat16
    x, h = coupling_inputs(mask, parity, scale, dtype, "channel-slice", (4, 6, 33, 17))
    for op in ("coupling_forward", "coupling_inverse"):
        check_coupling_against_reference(fused, op, x, h, mask, parity, scale)
    log_scale, bias, weight = 0.3 * torch.randn(6), torch.randn(6), torch.randn(6, 6) / 6 ** 0.5
    for op, args in (("actnorm_forward", (x, log_scale, bias)), ("actnorm_inverse", (x, log_scale, bias)),
                     ("conv1x1", (x, weight, bias))):
        got = getattr(fused, op)(*args)
        expected = getattr(reference, op)(*args)
        got, expected = (got, expected) if isinstance(got, tuple) else ((got,), (expected,))
        assert_close(got, expected, dtype, op)
    g = make(x.shape, dtype)
    expected = (torch.einsum("nohw,nkhw->ok", g.double(), x.double()), g.double().sum((0, 2, 3)))
    assert_close(fused.ops.conv1x1_weight_grad(g, x), expected, torch.float32, "conv1x1_weight_grad")


@pytest.mark.gpu
@pytest.mark.parametrize("mask,parity,scale", BFLOAT16_CASES)
def test_bfloat16_on_gpu(fused, mask, parity, scale):
    """The interpreter gets bfloat16 wrong, so the Triton kernels are checked in bfloat16 on a GPU only."""
    check_bfloat16(fused, mask, parity, scale)


@pytest.mark.parametrize("mask,parity,scale", BFLOAT16_CASES)
def test_bfloat16_in_the_native_kernels(monkeypatch, mask, parity, scale):
    """The compiled kernels (the CPU's, without a GPU) in bfloat16: vectorised in float32 like float16."""
    check_bfloat16(load_backend("native", monkeypatch), mask, parity, scale)


TRITON_BAD_INPUT = [
    (lambda ops: ops.actnorm(make((2, 4, 3, 3)), torch.zeros(3), torch.zeros(4), False),
     ValueError, r"log_scale must have shape \(4,\) for input of shape \(2, 4, 3, 3\)"),
    (lambda ops: ops.actnorm_backward(make((2, 4, 3, 3)), make((2, 4, 3, 3)), torch.zeros(4), torch.zeros(5), True),
     ValueError, r"bias must have shape \(4,\)"),
    (lambda ops: ops.actnorm_backward(make((2, 4, 3, 2)), make((2, 4, 3, 3)), torch.zeros(4), torch.zeros(4), True),
     ValueError, r"expected grad_out of shape \(2, 4, 3, 3\), got \(2, 4, 3, 2\)"),
    (lambda ops: ops.coupling_forward(make((2, 4, 3, 3)), make((2, 4, 3, 3)), "stripes", 0, "sigmoid", 2.0, "halves"),
     ValueError, r"mask must be one of 'channel', 'checkerboard', got 'stripes'"),
    (lambda ops: ops.coupling_backward(make((2, 4, 3, 3)), torch.zeros(3), make((2, 4, 3, 3)), make((2, 4, 3, 3)),
                                       "channel", 0, "sigmoid", 2.0, "halves", False),
     ValueError, r"expected grad_logdet of shape \(2,\), got \(3,\)"),
    (lambda ops: ops.conv1x1(make((2, 4, 3, 3)), torch.randn(4, 5), None),
     ValueError, r"weight must have shape \(C_out, 4\) for input of shape \(2, 4, 3, 3\), got \(4, 5\)"),
    (lambda ops: ops.conv1x1(make((2, 4, 3, 3)), torch.randn(6, 4), torch.zeros(4)),
     ValueError, r"bias must have shape \(6,\)"),
    (lambda ops: ops.conv1x1_weight_grad(make((2, 6, 3, 2)), make((2, 4, 3, 3))),
     ValueError, r"expected grad_out of shape \(2, 6, 3, 3\), got \(2, 6, 3, 2\)"),
    (lambda ops: ops.conv1x1(torch.randn(2, 4, 3), torch.randn(4, 4), None),
     ValueError, r"input must have shape \(N, C, H, W\)"),
    (lambda ops: ops.folded_lu_weight(*lu_inputs(4, torch.float32)[:6], torch.zeros(5)),
     ValueError, r"bias must have shape \(4,\) for a perm of shape \(4, 4\), got \(5,\)"),
    (lambda ops: ops.folded_lu_weight(torch.eye(4)[:3], *lu_inputs(4, torch.float32)[1:]),
     ValueError, r"perm must be a square \(C, C\) matrix, got shape \(3, 4\)"),
    (lambda ops: ops.folded_lu_weight(*lu_inputs(4, torch.float32)[:6], torch.zeros(4, dtype=torch.float64)),
     TypeError, r"expected every factor in float32, or every factor in float64"),
    (lambda ops: ops.folded_lu_weight_backward(torch.randn(4, 3), torch.randn(4), torch.randn(()),
                                               *lu_inputs(4, torch.float32), torch.randn(4, 4)),
     ValueError, r"expected grad_weight of shape \(4, 4\)"),
]


@pytest.mark.parametrize("call,error,message", TRITON_BAD_INPUT)
def test_triton_ops_refuse_bad_input_before_launching(call, error, message, monkeypatch):
    """Called directly, as torch.ops, the Triton ops check their arguments as the compiled ones do: a
    short parameter would be read out of bounds, an unknown option would fail deep in the launcher."""
    backend = load_backend("triton", monkeypatch)
    with pytest.raises(error, match=message):
        call(backend.ops)
