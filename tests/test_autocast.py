"""Mixed precision: under ``torch.autocast`` the conditioners run in the low-precision dtype, while the flow's
state, ActNorm, the 1×1 conv and every log-det keep float32; the fused couplings take a low-precision ``h``
with a float32 ``x``. CPU autocast runs in bfloat16 and float16 here (Triton's interpreter gets bfloat16
wrong: it is tested with float16 ``h``)."""
import math

import pytest
import torch

import flowkern
from helpers import initialize, randomize_
from flowkern.reference._dtypes import LOWER_PRECISION
from fused_backends import FUSED_BACKENDS, LOGDET_TOLERANCE, TOLERANCE, load_backend, make, value_and_grads

# How far a model under autocast may be from the same model in float32: two units in the last place of the
# conditioner's dtype (bfloat16: 2⁻⁶), relative for log-densities and gradients, absolute for a round trip
# (whose rebuilt inputs feed the conditioners again, so h can round the other way: one unit of h's last place).
AUTOCAST_TOLERANCE = {dtype: 2 * torch.finfo(dtype).eps for dtype in (torch.bfloat16, torch.float16)}
# Parameter gradients against float32 are bounded by ReLU masks, not by rounding: a conditioner pre-activation
# within a rounding of zero flips its ReLU (on a Glow's first conditioner: 8 of 4096 in bfloat16, 1 in float16),
# the number of flips grows with eps and their effects add like a random walk, so a gradient's relative error
# grows like sqrt(eps), with a heavy tail when a single flip dominates. Over 60 seeds of the test below its
# largest error was 1.9·sqrt(eps) in bfloat16 and 3.8·sqrt(eps) in float16.
GRADIENT_TOLERANCE = {dtype: 4 * math.sqrt(torch.finfo(dtype).eps) for dtype in (torch.bfloat16, torch.float16)}

MODELS = {
    "glow": (lambda: flowkern.Glow(3, 8, levels=2, steps=2, hidden_channels=16), (3, 8, 8)),
    "realnvp": (lambda: flowkern.RealNVP(3, 8, scales=2, hidden_channels=16, blocks=1), (3, 8, 8)),
    "realnvp2d": (lambda: flowkern.RealNVP2d(hidden=16, layers=4), (2,)),
}
BACKENDS = ["reference", *[b for b in FUSED_BACKENDS if b != "triton"]]  # triton: bfloat16 needs a GPU


def trained_like(name):
    factory, shape = MODELS[name]
    x = torch.rand(16, *shape) - 0.5
    model = initialize(factory(), x) if len(shape) == 3 else factory()
    return randomize_(model, 0.05).eval(), x


def latents(zs):
    return zs if isinstance(zs, list) else [zs]


LOW = pytest.mark.parametrize("low", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])


@LOW
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", MODELS)
def test_models_under_autocast_keep_float32_state_and_log_densities(name, backend, low):
    if backend not in flowkern.available_backends():
        pytest.skip(f"{backend} unavailable")
    model, x = trained_like(name)
    tol = AUTOCAST_TOLERANCE[low]
    with flowkern.use_backend(backend), torch.no_grad():
        expected_zs, expected_logdet = model(x)
        expected = model.log_prob(x)
        with torch.autocast("cpu", low):
            zs, logdet = model(x)
            log_prob = model.log_prob(x)
            back = model.inverse(zs)
            samples = model.sample(4, temperature=0.7)
    assert logdet.dtype == log_prob.dtype == back.dtype == samples.dtype == torch.float32
    assert all(z.dtype == torch.float32 for z in latents(zs))
    torch.testing.assert_close(log_prob, expected, rtol=tol, atol=0)
    torch.testing.assert_close(logdet, expected_logdet, rtol=tol, atol=tol * expected_logdet.abs().max().item())
    torch.testing.assert_close(back, x, rtol=0, atol=tol)
    assert torch.isfinite(samples).all()


@LOW
@pytest.mark.parametrize("memory_saving", [False, True], ids=["backprop", "by-inversion"])
def test_training_under_autocast(memory_saving, low):
    """Gradients under autocast are those of float32 within GRADIENT_TOLERANCE, and training by inversion
    rebuilds each layer under the autocast of its forward: its gradients are standard backprop's."""
    model, x = trained_like("glow")
    model.train()
    loss = -model.log_prob(x).mean()
    expected = torch.autograd.grad(loss, list(model.parameters()))
    model.set_memory_saving(memory_saving)
    with torch.autocast("cpu", low):
        loss_low = -model.log_prob(x).mean()
    got = torch.autograd.grad(loss_low, list(model.parameters()))
    assert loss_low.dtype == torch.float32 and all(g.dtype == torch.float32 for g in got)
    tol = AUTOCAST_TOLERANCE[low]
    torch.testing.assert_close(loss_low, loss, rtol=tol, atol=0)
    if memory_saving:  # against standard backprop under the same autocast
        model.set_memory_saving(False)
        with torch.autocast("cpu", low):
            standard = torch.autograd.grad(-model.log_prob(x).mean(), list(model.parameters()))
        for i, (g, e) in enumerate(zip(got, standard)):
            assert (g - e).norm() <= tol * e.norm() + 1e-12, f"parameter {i}"
    for i, (g, e) in enumerate(zip(got, expected)):
        error = (g - e).norm() / e.norm()
        assert (g - e).norm() <= GRADIENT_TOLERANCE[low] * e.norm() + 1e-6, f"parameter {i}: {error}"


@LOW
def test_training_by_inversion_keeps_the_flow_math_in_float32_under_autocast(low):
    """On a freshly initialised Glow the couplings are the identity (their last convolution is zero), so the
    1×1 convs' LU parameters get gradients that do not depend on the low-precision conditioners: under
    autocast, by inversion as by backprop, they are float32's to float32 rounding. The rebuilt layer's
    backward must run as any backward does (its forward under the forward's autocast, its gradients not)."""
    x = torch.rand(8, 3, 16, 16) - 0.5
    model = initialize(flowkern.Glow(3, 16, levels=2, steps=3, hidden_channels=32), x).train()
    lu = [p for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] in ("lower", "upper", "log_s")]
    expected = torch.autograd.grad(model.bits_per_dim(x).mean(), lu)
    for memory_saving in (False, True):
        model.set_memory_saving(memory_saving)
        with torch.autocast("cpu", low):
            loss = model.bits_per_dim(x).mean()
        for i, (g, e) in enumerate(zip(torch.autograd.grad(loss, lu), expected)):
            error = ((g - e).norm() / e.norm()).item()
            assert error <= 1e-4, f"memory_saving={memory_saving}, LU parameter {i}: relative error {error:.2g}"


# Each x dtype with each lower-precision h it takes (reference._dtypes.LOWER_PRECISION).
MIXED_DTYPES = [(x, h) for x, lower in LOWER_PRECISION.items() for h in lower]


@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
@pytest.mark.parametrize("mask, scale", [("channel", "sigmoid"), ("checkerboard", "exp"), ("channel", "additive")])
@pytest.mark.parametrize("x_dtype, h_dtype", MIXED_DTYPES, ids=lambda t: str(t).removeprefix("torch."))
@pytest.mark.parametrize("name", FUSED_BACKENDS)
def test_fused_couplings_take_a_low_precision_h(name, x_dtype, h_dtype, mask, scale, inverse, monkeypatch):
    """x with h in a lower precision, read by the kernels as it is (the op is called with both), at odd and
    multi-program shapes and on channel slices: outputs and log-dets in x's dtype and equal to the
    reference's on the same inputs; ∂h in h's dtype."""
    if name == "triton" and h_dtype == torch.bfloat16 and not torch.cuda.is_available():
        pytest.skip("Triton's interpreter gets bfloat16 arithmetic wrong; GPU only")
    backend = load_backend(name, monkeypatch)
    op = "coupling_inverse" if inverse else "coupling_forward"
    for shape in [(2, 5, 7, 3), (3, 6, 33, 37)]:
        x = make(shape, dtype=x_dtype, layout="channel-slice")
        c_h = flowkern.reference.conditioner_channels(shape[1], mask, 1, scale)[1]
        h = make((shape[0], c_h, *shape[2:]), dtype=h_dtype, layout="channel-slice")
        upstream = [torch.randn(shape, dtype=x_dtype), torch.randn(shape[0], dtype=x_dtype)]

        def run(module):
            return value_and_grads(lambda a, b: getattr(module, op)(a, b, mask, 1, scale, 2.0), [x, h], upstream)
        (out, logdet), (grad_x, grad_h) = run(backend)
        (ref_out, ref_logdet), (ref_grad_x, ref_grad_h) = run(flowkern.reference)
        assert out.dtype == logdet.dtype == grad_x.dtype == x_dtype and grad_h.dtype == h_dtype
        what = f"{name} {op} {mask} {scale} {shape}"
        torch.testing.assert_close(out, ref_out, **TOLERANCE[x_dtype], msg=what)
        torch.testing.assert_close(logdet, ref_logdet, **LOGDET_TOLERANCE[x_dtype], msg=what)
        torch.testing.assert_close(grad_x, ref_grad_x, **TOLERANCE[x_dtype], msg=what)
        torch.testing.assert_close(grad_h, ref_grad_h, **TOLERANCE[h_dtype], msg=what)


def test_an_h_of_higher_precision_than_x_is_refused():
    x, h = torch.randn(2, 4, 3, 3, dtype=torch.float16), torch.randn(2, 4, 3, 3)
    with pytest.raises(TypeError, match="expected h of dtype torch.float16 for x of dtype torch.float16"):
        flowkern.functional.coupling_forward(x, h)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_bfloat16_model_evaluates_samples_and_inverts(backend):
    """``model.to(torch.bfloat16)``: the state is bfloat16 too, log-densities stay float32; a round trip is
    exact to bfloat16's resolution: every layer rounds the state once each way, so the error may grow by one
    unit in the last place (of values of order 1) per layer."""
    if backend not in flowkern.available_backends():
        pytest.skip(f"{backend} unavailable")
    model, x = trained_like("glow")
    with torch.no_grad():
        expected = model.log_prob(x)
        model = model.to(torch.bfloat16)
        x16 = x.bfloat16()
        with flowkern.use_backend(backend):
            log_prob = model.log_prob(x16)
            zs, logdet = model(x16)
            back = model.inverse(zs)
            samples = model.sample(4, temperature=0.7)
    eps = torch.finfo(torch.bfloat16).eps
    assert log_prob.dtype == logdet.dtype == torch.float32 and back.dtype == samples.dtype == torch.bfloat16
    torch.testing.assert_close(log_prob, expected, rtol=2 * eps, atol=0)
    layers = sum(len(list(chain.units())) for chain in model.chains())
    torch.testing.assert_close(back.float(), x16.float(), rtol=0, atol=layers * eps)
    assert torch.isfinite(samples.float()).all()
