"""Mixed precision: under ``torch.autocast`` the conditioners run in the low-precision dtype, while the flow's
state, ActNorm, the 1×1 conv and every log-det keep float32; the fused couplings take a low-precision ``h``
with a float32 ``x``. On the CPU, autocast runs in bfloat16 (Triton's interpreter cannot: it is tested with
float16 ``h``)."""
import pytest
import torch

import flowkern
from helpers import initialize, randomize_
from kernels import FUSED_BACKENDS, TOLERANCE, load_backend, make, value_and_grads

# How far a model under autocast may be from the same model in float32: two units in the last place of the
# conditioner's dtype (bfloat16: 2⁻⁶), relative for log-densities and gradients, absolute for a round trip
# (whose rebuilt inputs feed the conditioners again, so h can round the other way: one unit of h's last place).
AUTOCAST_TOLERANCE = {dtype: 2 * torch.finfo(dtype).eps for dtype in (torch.bfloat16, torch.float16)}

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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", MODELS)
def test_models_under_autocast_keep_float32_state_and_log_densities(name, backend):
    if backend not in flowkern.available_backends():
        pytest.skip(f"{backend} unavailable")
    model, x = trained_like(name)
    tol = AUTOCAST_TOLERANCE[torch.bfloat16]
    with flowkern.use_backend(backend), torch.no_grad():
        expected_zs, expected_logdet = model(x)
        expected = model.log_prob(x)
        with torch.autocast("cpu", torch.bfloat16):
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


@pytest.mark.parametrize("memory_saving", [False, True], ids=["backprop", "by-inversion"])
def test_training_under_autocast(memory_saving):
    """Gradients under autocast are those of float32 to the conditioners' precision, and training by
    inversion rebuilds each layer under the autocast of its forward: its gradients are standard backprop's."""
    model, x = trained_like("glow")
    model.train()
    loss = -model.log_prob(x).mean()
    expected = torch.autograd.grad(loss, list(model.parameters()))
    model.set_memory_saving(memory_saving)
    with torch.autocast("cpu", torch.bfloat16):
        loss_low = -model.log_prob(x).mean()
    got = torch.autograd.grad(loss_low, list(model.parameters()))
    assert loss_low.dtype == torch.float32 and all(g.dtype == torch.float32 for g in got)
    tol = AUTOCAST_TOLERANCE[torch.bfloat16]
    torch.testing.assert_close(loss_low, loss, rtol=tol, atol=0)
    if memory_saving:  # against standard backprop under the same autocast
        model.set_memory_saving(False)
        with torch.autocast("cpu", torch.bfloat16):
            standard = torch.autograd.grad(-model.log_prob(x).mean(), list(model.parameters()))
        for i, (g, e) in enumerate(zip(got, standard)):
            assert (g - e).norm() <= tol * e.norm() + 1e-12, f"parameter {i}"
    for i, (g, e) in enumerate(zip(got, expected)):
        assert (g - e).norm() <= 10 * tol * e.norm() + 1e-6, f"parameter {i}: {(g - e).norm() / e.norm()}"


@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
@pytest.mark.parametrize("mask, scale", [("channel", "sigmoid"), ("checkerboard", "exp"), ("channel", "additive")])
@pytest.mark.parametrize("name", FUSED_BACKENDS)
def test_fused_couplings_take_a_low_precision_h(name, mask, scale, inverse, monkeypatch):
    """x float32 with h in a lower precision, odd and multi-program shapes and a channel slice: outputs and
    log-dets float32 and equal to the reference's on the same inputs; ∂h in h's dtype."""
    backend = load_backend(name, monkeypatch)
    h_dtype = torch.float16 if name == "triton" and not torch.cuda.is_available() else torch.bfloat16
    op = "coupling_inverse" if inverse else "coupling_forward"
    for shape in [(2, 5, 7, 3), (3, 6, 33, 37)]:
        x = make(shape, layout="channel-slice")
        c_h = flowkern.reference.conditioner_channels(shape[1], mask, 1, scale)[1]
        h = make((shape[0], c_h, *shape[2:]), dtype=h_dtype, layout="channel-slice")
        upstream = [torch.randn(shape), torch.randn(shape[0])]

        def run(module):
            return value_and_grads(lambda a, b: getattr(module, op)(a, b, mask, 1, scale, 2.0), [x, h], upstream)
        (out, logdet), (grad_x, grad_h) = run(backend)
        (ref_out, ref_logdet), (ref_grad_x, ref_grad_h) = run(flowkern.reference)
        assert out.dtype == logdet.dtype == grad_x.dtype == torch.float32 and grad_h.dtype == h_dtype
        what = f"{name} {op} {mask} {scale} {shape}"
        torch.testing.assert_close(out, ref_out, **TOLERANCE[torch.float32], msg=what)
        torch.testing.assert_close(logdet, ref_logdet, rtol=1e-5, atol=1e-4, msg=what)
        torch.testing.assert_close(grad_x, ref_grad_x, **TOLERANCE[torch.float32], msg=what)
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
