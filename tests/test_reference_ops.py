"""The reference ops: their formulas, inverses, log-dets (against brute-force Jacobians) and gradients."""
import itertools

import pytest
import torch

from flowkern import reference as R

from helpers import bruteforce_logdet

COUPLINGS = list(itertools.product(R.MASKS, (0, 1), R.SCALES))


def coupling_inputs(shape, mask, parity, scale, dtype=torch.float64):
    x = torch.randn(shape, dtype=dtype)
    h_channels = R.conditioner_channels(shape[1], mask, parity, scale)[1]
    h = torch.randn(shape[0], h_channels, *shape[2:], dtype=dtype)
    return x, h


@pytest.mark.parametrize("mask,parity,scale", COUPLINGS)
def test_coupling_inverse_and_logdet(mask, parity, scale):
    x, h = coupling_inputs((3, 5, 3, 5), mask, parity, scale)
    y, logdet = R.coupling_forward(x, h, mask, parity, scale, 1.5)
    x_back, logdet_back = R.coupling_inverse(y, h, mask, parity, scale, 1.5)
    assert (x_back - x).abs().max() < 1e-12
    torch.testing.assert_close(logdet_back, logdet, rtol=1e-12, atol=1e-12)
    expected = bruteforce_logdet(lambda v: R.coupling_forward(v, h[:1], mask, parity, scale, 1.5)[0], x[:1])
    torch.testing.assert_close(logdet[:1], expected, rtol=1e-10, atol=1e-10)
    if scale == "additive":
        assert torch.all(logdet == 0)
    else:
        assert logdet.abs().min() > 1e-3


@pytest.mark.parametrize("parity", (0, 1))
def test_channel_coupling_formula_with_uneven_split(parity):
    x, h = coupling_inputs((2, 5, 4, 3), "channel", parity, "sigmoid", torch.float32)
    y, logdet = R.coupling_forward(x, h, "channel", parity, "sigmoid")
    passed = slice(0, 3) if parity == 0 else slice(3, 5)
    changed = slice(3, 5) if parity == 0 else slice(0, 3)
    raw, shift = h.chunk(2, dim=1)
    s = torch.sigmoid(raw + 2)
    assert R.channel_split_sizes(5, parity) == ((3, 2) if parity == 0 else (2, 3))
    assert torch.equal(y[:, passed], x[:, passed])
    torch.testing.assert_close(y[:, changed], x[:, changed] * s + shift)
    torch.testing.assert_close(logdet, torch.log(s).sum(dim=(1, 2, 3)))


@pytest.mark.parametrize("parity", (0, 1))
def test_checkerboard_coupling_formula(parity):
    x, h = coupling_inputs((2, 3, 5, 4), "checkerboard", parity, "exp", torch.float32)
    y, logdet = R.coupling_forward(x, h, "checkerboard", parity, "exp", 0.7)
    i, j = torch.meshgrid(torch.arange(5), torch.arange(4), indexing="ij")
    moved = (i + j + parity) % 2 == 1
    raw, shift = h.chunk(2, dim=1)
    log_s = 0.7 * torch.tanh(raw)
    assert torch.equal(y[..., ~moved], x[..., ~moved])
    torch.testing.assert_close(y[..., moved], (x * log_s.exp() + shift)[..., moved])
    torch.testing.assert_close(logdet, log_s[..., moved].sum(dim=(1, 2)))
    cond = R.coupling_condition(x, "checkerboard", parity)
    assert torch.all(cond[..., moved] == 0) and torch.equal(cond[..., ~moved], x[..., ~moved])


@pytest.mark.parametrize("scale,log_s", [
    ("sigmoid", lambda raw, b: torch.log(torch.sigmoid(raw + 2))),
    ("reciprocal_sigmoid", lambda raw, b: -torch.log(torch.sigmoid(raw + 2))),
    ("exp", lambda raw, b: b * torch.tanh(raw)),
    ("plain_exp", lambda raw, b: raw),
    ("atan", lambda raw, b: 0.636 * b * torch.atan(raw)),
])
def test_coupling_scale_formulas(scale, log_s):
    x, h = coupling_inputs((2, 4, 3, 3), "channel", 0, scale)
    y, logdet = R.coupling_forward(x, h, "channel", 0, scale, 1.7)
    raw, shift = h.chunk(2, dim=1)
    torch.testing.assert_close(y[:, 2:], x[:, 2:] * log_s(raw, 1.7).exp() + shift, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logdet, log_s(raw, 1.7).sum(dim=(1, 2, 3)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scale", ["sigmoid", "additive"])
@pytest.mark.parametrize("mask,parity", [("channel", 0), ("checkerboard", 1)])
def test_coupling_h_layouts_reorder_raw_and_shift(mask, parity, scale):
    """``shift_halves`` is ``shift, raw = h.chunk(2)`` and ``interleaved`` ``shift, raw = h[:, 0::2], h[:, 1::2]``:
    the same coupling as the halves ``raw, shift`` with h's planes reordered (additive h is the shift alone)."""
    x, h = coupling_inputs((2, 5, 3, 4), mask, parity, scale)
    raw, shift = (None, h) if scale == "additive" else h.chunk(2, dim=1)
    reordered = {"halves": h, "shift_halves": h if raw is None else torch.cat((shift, raw), dim=1),
                 "interleaved": h if raw is None else torch.stack((shift, raw), dim=2).flatten(1, 2)}
    expected = R.coupling_forward(x, h, mask, parity, scale)
    for layout, h_in_layout in reordered.items():
        assert R.split_h(h_in_layout, scale, layout)[1].equal(shift)
        for got, want in zip(R.coupling_forward(x, h_in_layout, mask, parity, scale, layout=layout), expected):
            assert torch.equal(got, want), layout


@pytest.mark.parametrize("mask,parity,scale", COUPLINGS)
def test_coupling_gradcheck(mask, parity, scale):
    x, h = coupling_inputs((2, 3, 3, 2), mask, parity, scale)
    x.requires_grad_(True)
    h.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: R.coupling_forward(a, b, mask, parity, scale, 1.3), (x, h))
    assert torch.autograd.gradcheck(lambda a, b: R.coupling_inverse(a, b, mask, parity, scale, 1.3), (x, h))


def test_half_precision_inputs_keep_dtype_and_accumulate_logdet_in_float32():
    x, h = coupling_inputs((2, 4, 3, 3), "channel", 0, "sigmoid", torch.float16)
    y, logdet = R.coupling_forward(x, h)
    assert y.dtype == torch.float16 and logdet.dtype == torch.float32
    y32, logdet32 = R.coupling_forward(x.float(), h.float())
    torch.testing.assert_close(logdet, logdet32)
    torch.testing.assert_close(y.float(), y32, rtol=1e-3, atol=1e-3)
    a, ld = R.actnorm_forward(x, torch.randn(4), torch.randn(4))
    assert a.dtype == torch.float16 and ld.dtype == torch.float32


def test_actnorm_formula_inverse_logdet_and_gradcheck():
    x = torch.randn(3, 4, 5, 3, dtype=torch.float64)
    log_scale, bias = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    y, logdet = R.actnorm_forward(x, log_scale, bias)
    torch.testing.assert_close(y, x * log_scale.exp().view(1, 4, 1, 1) + bias.view(1, 4, 1, 1))
    torch.testing.assert_close(logdet, torch.full((3,), 15 * log_scale.sum().item(), dtype=torch.float64))
    torch.testing.assert_close(logdet[:1], bruteforce_logdet(lambda v: R.actnorm_forward(v, log_scale, bias)[0], x[:1]))
    x_back, logdet_back = R.actnorm_inverse(y, log_scale, bias)
    assert (x_back - x).abs().max() < 1e-12 and torch.equal(logdet_back, logdet)
    args = (x[:2, :, :2, :2].clone().requires_grad_(), log_scale.requires_grad_(), bias.requires_grad_())
    assert torch.autograd.gradcheck(R.actnorm_forward, args)
    assert torch.autograd.gradcheck(R.actnorm_inverse, args)


def lu_factors(c, dtype=torch.float64):
    """LU factors of a perturbed random rotation, as an InvConv1x1 holds them during training."""
    w = torch.linalg.qr(torch.randn(c, c, dtype=dtype))[0] + 0.1 * torch.randn(c, c, dtype=dtype)
    perm, lower, upper = torch.linalg.lu(w)
    diag = torch.diagonal(upper)
    # the strict triangles are masked inside lu_weight: fill the other entries with noise to prove it
    lower = torch.tril(lower, -1) + torch.triu(torch.randn(c, c, dtype=dtype))
    upper = torch.triu(upper, 1) + torch.tril(torch.randn(c, c, dtype=dtype))
    return perm, lower, upper, torch.sign(diag), torch.log(diag.abs())


def test_lu_weight_structure_logdet_and_inverse():
    perm, lower, upper, sign, log_s = lu_factors(7)
    w = R.lu_weight(perm, lower, upper, sign, log_s)
    l_unit = torch.tril(lower, -1) + torch.eye(7, dtype=torch.float64)
    u_full = torch.triu(upper, 1) + torch.diag(sign * log_s.exp())
    torch.testing.assert_close(w, perm @ l_unit @ u_full)
    torch.testing.assert_close(torch.linalg.slogdet(w)[1], log_s.sum())
    torch.testing.assert_close(R.lu_weight_inverse(perm, lower, upper, sign, log_s), torch.linalg.inv(w))


def test_lu_inverse_in_float32_is_accurate():
    factors64 = lu_factors(48)
    factors32 = [f.float() for f in factors64]
    w64 = R.lu_weight(*factors64)
    inv32 = R.lu_weight_inverse(*factors32)
    error = (inv32.double() @ w64 - torch.eye(48, dtype=torch.float64)).abs().max()
    assert error < 1e-5, f"W⁻¹·W deviates from I by {error:.2e}"


def test_lu_gradcheck():
    perm, lower, upper, sign, log_s = lu_factors(4)
    params = tuple(t.requires_grad_() for t in (lower, upper, log_s))
    assert torch.autograd.gradcheck(lambda a, b, c: R.lu_weight(perm, a, b, sign, c), params)
    assert torch.autograd.gradcheck(lambda a, b, c: R.lu_weight_inverse(perm, a, b, sign, c), params)


def test_conv1x1_formula_logdet_and_gradcheck():
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    w, b = torch.randn(5, 5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    y = R.conv1x1(x, w, b)
    torch.testing.assert_close(y, torch.einsum("oc,nchw->nohw", w, x) + b.view(1, 5, 1, 1))
    expected = bruteforce_logdet(lambda v: R.conv1x1(v, w), x[:1])
    torch.testing.assert_close(expected, torch.linalg.slogdet(w)[1].view(1) * 12)
    args = (x[:, :, :2, :3].clone().requires_grad_(), w.requires_grad_(), b.requires_grad_())
    assert torch.autograd.gradcheck(R.conv1x1, args)
    assert torch.autograd.gradcheck(lambda a, m: R.conv1x1(a, m), args[:2])


def test_squeeze_layout_and_inverse():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float64).reshape(2, 3, 4, 6)
    y = R.squeeze(x)
    assert y.shape == (2, 12, 2, 3)
    # channel c·4 + 2·di + dj holds pixel (2i + di, 2j + dj) of input channel c
    for c, di, dj in itertools.product(range(3), range(2), range(2)):
        assert torch.equal(y[:, c * 4 + 2 * di + dj], x[:, c, di::2, dj::2])
    assert torch.equal(R.unsqueeze(y), x)
    assert torch.autograd.gradcheck(R.squeeze, (torch.randn(1, 2, 4, 2, dtype=torch.float64, requires_grad=True),))
    assert torch.autograd.gradcheck(R.unsqueeze, (torch.randn(1, 8, 2, 1, dtype=torch.float64, requires_grad=True),))


def test_standardize_is_a_gaussian_prior():
    z, mean, log_std = (torch.randn(3, 2, 3, 3, dtype=torch.float64) for _ in range(3))
    eps, logdet = R.standardize(z, mean, log_std)
    prior = torch.distributions.Normal(mean, log_std.exp()).log_prob(z).sum(dim=(1, 2, 3))
    torch.testing.assert_close(R.standard_normal_log_prob(eps) + logdet, prior)
    z_back = R.unstandardize(eps, mean, log_std)
    assert z_back.shape == z.shape and (z_back - z).abs().max() < 1e-12
    args = tuple(t[:1, :, :2, :2].clone().requires_grad_() for t in (z, mean, log_std))
    assert torch.autograd.gradcheck(R.standardize, args)
    assert torch.autograd.gradcheck(R.unstandardize, args)
    torch.testing.assert_close(
        R.standard_normal_log_prob(z),
        torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(dim=(1, 2, 3)))


def test_logsigmoid_scale_matches_definition():
    raw = torch.randn(100, dtype=torch.float64) * 10
    torch.testing.assert_close(R.coupling.log_scale(raw, "sigmoid", 0.0), torch.log(torch.sigmoid(raw + 2)))
    torch.testing.assert_close(R.coupling.log_scale(raw, "exp", 1.7), 1.7 * torch.tanh(raw))
    assert R.coupling.log_scale(torch.tensor(-200.0), "sigmoid", 0.0).isfinite()
