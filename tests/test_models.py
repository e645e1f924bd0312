"""Whole models: round trips, log-dets against brute-force Jacobians, densities, sampling, training."""
import math

import pytest
import torch

import flowkern
from flowkern.data import dequantize, load_digits, toy2d
from helpers import bruteforce_logdet, initialize, max_abs, randomize_


def glow(**kw):
    args = dict(in_channels=3, image_size=8, levels=3, steps=4, hidden_channels=16)
    return flowkern.Glow(**{**args, **kw})


def image_batch(n, c, size, dtype=torch.float32):
    return (torch.rand(n, c, size, size, dtype=dtype) - 0.5)


MODELS = [
    ("glow-affine", lambda: glow(), (6, 3, 8)),
    ("glow-additive-plain", lambda: glow(coupling="additive", lu=False, learn_prior=False), (6, 3, 8)),
    ("realnvp", lambda: flowkern.RealNVP(2, 8, scales=2, hidden_channels=8, blocks=1), (6, 2, 8)),
]


@pytest.mark.parametrize("name,factory,shape", MODELS, ids=[m[0] for m in MODELS])
def test_image_model_round_trip(name, factory, shape):
    n, c, size = shape
    model = randomize_(initialize(factory(), image_batch(n, c, size)), 0.02)
    x = image_batch(n, c, size)
    zs, logdet = model(x)
    assert [tuple(z.shape[1:]) for z in zs] == model.latent_shapes()
    assert logdet.shape == (n,) and torch.isfinite(logdet).all()
    error = max_abs(model.inverse(zs), x)
    assert error <= 1e-4, f"{name}: max |inverse(forward(x)) − x| = {error:.2e}"


def test_glow_k4_l3_round_trip_at_cifar_width():
    model = randomize_(initialize(glow(image_size=16, hidden_channels=64), image_batch(8, 3, 16)), 0.01)
    x = image_batch(4, 3, 16)
    zs, _ = model(x)
    assert [z.shape[1:] for z in zs] == [(6, 8, 8), (12, 4, 4), (48, 2, 2)]
    assert max_abs(model.inverse(zs), x) <= 1e-4


def test_realnvp2d_round_trip():
    model = randomize_(flowkern.RealNVP2d(dim=3, hidden=32, layers=6), 0.05)
    x = torch.randn(64, 3)
    z, logdet = model(x)
    assert z.shape == (64, 3) and logdet.shape == (64,)
    assert max_abs(model.inverse(z), x) <= 1e-4
    assert max_abs(z, x) > 1e-2


TINY = [
    ("glow", lambda: flowkern.Glow(1, 4, levels=2, steps=2, hidden_channels=4), (3, 1, 4)),
    ("glow-additive", lambda: flowkern.Glow(2, 4, levels=2, steps=1, hidden_channels=4,
                                            coupling="additive", lu=False), (3, 2, 4)),
    ("realnvp", lambda: flowkern.RealNVP(1, 4, scales=2, hidden_channels=4, blocks=1), (3, 1, 4)),
]


@pytest.mark.parametrize("name,factory,shape", TINY, ids=[m[0] for m in TINY])
def test_model_logdet_matches_bruteforce_jacobian(name, factory, shape):
    n, c, size = shape
    model = factory().double()
    initialize(model, image_batch(8, c, size, torch.float64))
    randomize_(model, 0.05)
    x = image_batch(n, c, size, torch.float64)
    logdet = model(x)[1]
    torch.testing.assert_close(logdet, bruteforce_logdet(lambda v: model(v)[0], x), rtol=1e-9, atol=1e-9)


def test_realnvp2d_logdet_matches_bruteforce_jacobian():
    model = randomize_(flowkern.RealNVP2d(dim=2, hidden=16, layers=4).double(), 0.1)
    x = torch.randn(3, 2, dtype=torch.float64)
    logdet = model(x)[1]
    torch.testing.assert_close(logdet, bruteforce_logdet(lambda v: model(v)[0], x), rtol=1e-9, atol=1e-9)


def test_log_prob_and_bits_per_dim_definitions():
    model = randomize_(initialize(glow(), image_batch(8, 3, 8)), 0.02)
    x = image_batch(5, 3, 8)
    zs, logdet = model(x)
    normal = torch.distributions.Normal(0.0, 1.0)
    prior = sum(normal.log_prob(z).flatten(1).sum(1) for z in zs)
    torch.testing.assert_close(model.log_prob(x), logdet + prior)
    dims = 3 * 8 * 8
    expected = (-(logdet + prior) + dims * math.log(32)) / (dims * math.log(2))
    torch.testing.assert_close(model.bits_per_dim(x, n_bins=32), expected)


def test_realnvp2d_log_prob_is_a_density():
    """On a 2-D grid, exp(log_prob) integrates to about 1."""
    model = randomize_(flowkern.RealNVP2d(hidden=16, layers=4), 0.1)
    axis = torch.linspace(-8, 8, 401)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), dim=-1).reshape(-1, 2)
    with torch.no_grad():
        mass = model.log_prob(grid).exp().sum() * (axis[1] - axis[0]) ** 2
    assert abs(mass.item() - 1) < 0.01, f"density integrates to {mass.item():.4f}"


@pytest.mark.parametrize("temperature", (0.0, 0.7, 1.0))
def test_sampling_at_temperatures(temperature):
    model = randomize_(initialize(glow(), image_batch(8, 3, 8)), 0.02)
    samples = model.sample(5, temperature=temperature)
    assert samples.shape == (5, 3, 8, 8) and torch.isfinite(samples).all()
    if temperature == 0:
        assert torch.equal(samples, model.sample(5, temperature=0.0))
    realnvp = flowkern.RealNVP(1, 8, scales=2, hidden_channels=8, blocks=1)
    assert torch.isfinite(realnvp.sample(3, temperature)).all()
    points = flowkern.RealNVP2d().sample(7, temperature)
    assert points.shape == (7, 2) and torch.isfinite(points).all()


def test_sample_spread_grows_with_temperature():
    model = randomize_(initialize(glow(), image_batch(8, 3, 8)), 0.02)
    spread = [model.sample(64, t).std().item() for t in (0.0, 0.5, 1.0)]
    assert spread[0] < spread[1] < spread[2]


def test_glow_state_dict_round_trip_keeps_actnorm_initialisation():
    model = randomize_(initialize(glow(), image_batch(8, 3, 8)), 0.02)
    restored = glow()
    restored.load_state_dict(model.state_dict())
    restored.train()
    x = image_batch(4, 3, 8)
    torch.testing.assert_close(restored(x)[1], model(x)[1])


def test_training_on_digits_lowers_bits_per_dim():
    torch.manual_seed(1)
    levels, _ = load_digits()
    train, test = levels[:1500], levels[1500:]
    model = flowkern.Glow(1, 8, levels=2, steps=4, hidden_channels=32)
    evaluation = dequantize(test, 17, noise=False)
    initialize(model, dequantize(train[:256], 17))
    with torch.no_grad():
        before = model.bits_per_dim(evaluation, n_bins=17).mean().item()
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for step in range(150):
        for group in optimizer.param_groups:
            group["lr"] = 2e-3 * min(1.0, (step + 1) / 20)  # warm-up
        batch = dequantize(train[torch.randint(0, len(train), (64,))], 17)
        loss = model.bits_per_dim(batch, n_bins=17).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 50.0)
        optimizer.step()
    model.eval()
    with torch.no_grad():
        after = model.bits_per_dim(evaluation, n_bins=17).mean().item()
    print(f"digits test bits/dim: {before:.3f} before training, {after:.3f} after 150 steps")
    assert math.isfinite(after)
    assert after < before - 1.0, f"bits/dim went from {before:.3f} to {after:.3f}"
    assert after < math.log2(17), f"{after:.3f} bits/dim is no better than a uniform model"


def test_toy_training_with_realnvp2d():
    torch.manual_seed(0)
    data = toy2d("moons", 2048)
    model = flowkern.RealNVP2d(hidden=32, layers=6)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    with torch.no_grad():
        before = -model.log_prob(data).mean().item()
    for _ in range(200):
        batch = data[torch.randint(0, len(data), (256,))]
        loss = -model.log_prob(batch).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = -model.log_prob(data).mean().item()
    print(f"moons nats/sample: {before:.3f} before, {after:.3f} after 200 steps")
    assert after < before - 1.0


def test_reference_glow_traces_without_graph_breaks():
    import torch._dynamo as dynamo

    model = randomize_(initialize(glow(), image_batch(8, 3, 8)), 0.02)
    model.train()  # ActNorm is initialised: training mode must not branch on tensor data either
    with flowkern.use_backend("reference"):
        explanation = dynamo.explain(model.log_prob)(image_batch(4, 3, 8))
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    assert explanation.graph_count == 1
