"""FFJORD: the divergences against brute-force Jacobians, the solved map's log-det and round trip, adjoint
against direct backprop, the density's normalisation, and a short training run on moons."""
import math

import pytest
import torch

import flowkern
from flowkern.data import toy2d
from flowkern.nn.continuous import (ConcatSquashConvNet, ConcatSquashMLP, draw_noise, exact_divergence,
                                    hutchinson_divergence)
from helpers import bruteforce_logdet, randomize_


def tight(model):
    """Solver tolerances far below the checks' own, in float64."""
    model.flow.rtol = model.flow.atol = 1e-9
    return model.double()


def brute_force_trace(net, t, z):
    """tr(∂net(t, z_i)/∂z_i) per sample from the full Jacobian."""
    traces = []
    for i in range(z.shape[0]):
        jac = torch.autograd.functional.jacobian(lambda v: net(t, v).flatten(), z[i:i + 1])
        traces.append(jac.reshape(jac.shape[0], -1).diagonal().sum())
    return torch.stack(traces)


@pytest.mark.parametrize("net,shape", [(ConcatSquashMLP(3, 16, 2), (3,)), (ConcatSquashConvNet(2, 4, 2), (2, 3, 3))],
                         ids=["mlp", "conv"])
def test_exact_divergence_is_the_trace_of_the_jacobian(net, shape):
    net = randomize_(net.double(), std=0.3)
    t, z = torch.tensor(0.37, dtype=torch.float64), torch.randn(4, *shape, dtype=torch.float64, requires_grad=True)
    div = exact_divergence(net(t, z), z)
    torch.testing.assert_close(div, brute_force_trace(net, t, z.detach()), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_hutchinson_estimate_is_unbiased(noise):
    """Its mean over many draws is within three standard errors of the exact trace, for every sample."""
    net = randomize_(ConcatSquashMLP(4, 16, 2).double(), std=0.3)
    t, z = torch.tensor(0.5, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    dz = net(t, z)
    exact = exact_divergence(dz, z)
    draws = 4000
    generator = torch.Generator().manual_seed(0)
    zs = z.detach().repeat(draws, 1).requires_grad_()
    estimates, _ = hutchinson_divergence(net(t, zs), zs, draw_noise(zs, noise, generator))
    estimates = estimates.reshape(draws, 3)
    standard_error = estimates.std(0) / math.sqrt(draws)
    assert (standard_error > 0).all()
    assert ((estimates.mean(0) - exact.detach()).abs() < 3 * standard_error).all(), (estimates.mean(0), exact)


@pytest.mark.parametrize("shape", [(2,), (1, 2, 2)], ids=["vector", "image"])
def test_log_det_equals_the_brute_force_jacobian_of_the_solved_map(shape):
    model = flowkern.FFJORD(shape, hidden=8, depth=2, divergence="exact", adjoint=False)  # Jacobian through the steps
    model = tight(randomize_(model, std=0.3)).eval()
    x = torch.randn(3, *shape, dtype=torch.float64)
    with torch.no_grad():
        _, logdet = model(x)
    expected = bruteforce_logdet(lambda v: model.flow(v)[0], x)
    torch.testing.assert_close(logdet, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape", [(2,), (1, 3, 3)], ids=["vector", "image"])
def test_inverse_of_forward_returns_x_within_the_solver_tolerance(shape):
    model = randomize_(flowkern.FFJORD(shape, hidden=16, depth=2), std=0.3).eval()
    for rtol, bound in ((1e-5, 1e-3), (1e-8, 1e-6)):
        model.flow.rtol = model.flow.atol = rtol
        x = torch.randn(5, *shape, dtype=torch.float64)
        with torch.no_grad():
            z, _ = model.double()(x)
            error = (model.inverse(z) - x).abs().max().item()
        assert error < bound, (rtol, error)


def test_adjoint_and_direct_backprop_give_the_same_gradients():
    x = torch.randn(16, 2, dtype=torch.float64)
    grads = []
    for adjoint in (True, False):
        torch.manual_seed(3)
        model = tight(randomize_(flowkern.FFJORD((2,), hidden=16, depth=2, adjoint=adjoint), std=0.3))
        (-model.log_prob(x).mean()).backward()
        grads.append([p.grad for p in model.parameters()])
    for adjoint_grad, direct_grad in zip(*grads):
        torch.testing.assert_close(adjoint_grad, direct_grad, rtol=1e-5, atol=1e-8)


def test_evaluation_takes_the_exact_trace_where_affordable_and_says_so():
    model = flowkern.FFJORD((1, 9, 9), hidden=4, depth=1)  # 81 dimensions: Hutchinson in training
    x = torch.randn(2, 1, 9, 9)
    model(x)
    assert model.flow.divergence == "hutchinson" and model.last_divergence == "hutchinson"
    small = flowkern.FFJORD((2,), hidden=4, depth=1, divergence="hutchinson").eval()
    with torch.no_grad():
        small.log_prob(torch.randn(3, 2))
    assert small.last_divergence == "exact"


def test_regularizers_are_integrated_and_reach_the_gradients():
    model = randomize_(flowkern.FFJORD((2,), hidden=8, depth=2, kinetic=0.1, jacobian=0.1), std=0.3)
    x = torch.randn(32, 2)
    nll = -model.log_prob(x).mean()
    assert model.flow.kinetic.shape == (32,) and (model.flow.kinetic > 0).all() and (model.flow.jacobian > 0).all()
    regularization = model.regularization()
    grad = torch.autograd.grad(regularization, list(model.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grad)
    assert torch.isfinite(nll)
    model.eval()
    with torch.no_grad():
        model(x)
    assert model.regularization() == 0.0  # evaluation integrates no regularisers


def test_function_evaluations_are_counted_for_forward_and_adjoint_backward():
    model = randomize_(flowkern.FFJORD((2,), hidden=8, depth=2), std=0.3)
    before = model.evaluations
    loss = -model.log_prob(torch.randn(8, 2)).mean()
    forward = model.nfe
    assert forward > 0 and model.evaluations - before == forward
    loss.backward()
    assert model.evaluations - before - forward > 0  # the adjoint solve evaluates the network again


@pytest.mark.parametrize("call,message", [
    (lambda: flowkern.FFJORD((2, 3)), "shape must be"),
    (lambda: flowkern.FFJORD((2,), divergence="trace"), "divergence must be"),
    (lambda: flowkern.FFJORD((2,), noise="uniform"), "noise must be"),
    (lambda: flowkern.FFJORD((2,), kinetic=-1.0), "kinetic must be a finite number >= 0"),
    (lambda: flowkern.FFJORD((2,))(torch.randn(4, 3)), r"shape \(N, 2\)"),
    (lambda: flowkern.FFJORD((2,)).set_memory_saving(True), "adjoint"),
])
def test_bad_arguments_are_refused_clearly(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.fixture(scope="module")
def moons_model():  # about 40 s on two cores
    """FFJORD trained briefly on moons, with its held-out set."""
    torch.manual_seed(0)
    train, test = toy2d("moons", 4000, seed=1), toy2d("moons", 2000, seed=2)
    model = flowkern.FFJORD((2,), hidden=32, depth=2, rtol=1e-4, atol=1e-4)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(150):
        batch = train[torch.randint(len(train), (256,), generator=generator)]
        loss = -model.log_prob(batch).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), train, test


@pytest.mark.slow
def test_a_short_training_run_on_moons_beats_a_fitted_gaussian(moons_model):
    model, train, test = moons_model
    gaussian = torch.distributions.MultivariateNormal(train.mean(0), torch.cov(train.T))
    with torch.no_grad():
        ffjord_nll = -model.log_prob(test).mean().item()
    gaussian_nll = -gaussian.log_prob(test).mean().item()
    assert ffjord_nll < gaussian_nll - 0.3, (ffjord_nll, gaussian_nll)


@pytest.mark.slow
def test_the_trained_density_integrates_to_one(moons_model):
    model = moons_model[0]
    step = 0.05
    axis = torch.arange(-5, 5, step) + step / 2
    grid = torch.cartesian_prod(axis, axis)
    with torch.no_grad():
        mass = model.log_prob(grid).exp().sum().item() * step ** 2
    assert abs(mass - 1) < 0.01, mass
