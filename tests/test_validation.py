"""Bad input gets ValueError/TypeError with a message that says what was expected."""
import math

import pytest
import torch

import flowkern
import flowkern.functional as F
import flowkern.nn as fnn

LAYERS = [
    ("ActNorm", lambda: fnn.ActNorm(4)),
    ("InvConv1x1", lambda: fnn.InvConv1x1(4)),
    ("AffineCoupling", lambda: fnn.AffineCoupling(4, 8)),
    ("AdditiveCoupling", lambda: fnn.AdditiveCoupling(4, 8, mask="checkerboard")),
    ("FlowStep", lambda: fnn.FlowStep(4, 8)),
    ("Split", lambda: fnn.Split(4)),
    ("Gaussianize", lambda: fnn.Gaussianize(4)),
]


@pytest.mark.parametrize("name,factory", LAYERS, ids=[n for n, _ in LAYERS])
def test_layer_rejects_wrong_rank_channels_dtype_and_device(name, factory):
    layer = factory()
    with pytest.raises(ValueError, match=r"shape \(N, C, H, W\)|4 dimensions"):
        layer(torch.randn(4, 3, 3))
    with pytest.raises(ValueError, match="must have 4 channels, got shape"):
        layer(torch.randn(2, 5, 3, 3))
    with pytest.raises(TypeError, match="dtype"):
        layer(torch.randn(2, 4, 3, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(2, 4, 3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="device"):
        layer(torch.randn(2, 4, 3, 3, device="meta"))
    with pytest.raises(TypeError, match="torch.Tensor"):
        layer([[1.0]])


def test_inverse_rejects_wrong_channels():
    with pytest.raises(ValueError, match="y must have 4 channels"):
        fnn.ActNorm(4).inverse(torch.randn(2, 3, 2, 2))
    with pytest.raises(ValueError, match="z1 must have 2 channels"):
        fnn.Split(4).inverse((torch.randn(2, 3, 2, 2), torch.randn(2, 2, 2, 2)))


def test_constructor_arguments_are_checked():
    with pytest.raises(ValueError, match="mask must be one of 'channel', 'checkerboard'"):
        fnn.AffineCoupling(4, mask="diagonal")
    with pytest.raises(ValueError, match="scale must be one of"):
        fnn.AffineCoupling(4, scale="softplus")
    with pytest.raises(ValueError, match="parity must be one of 0, 1"):
        fnn.AffineCoupling(4, parity=2)
    with pytest.raises(ValueError, match="at least 2 channels"):
        fnn.AffineCoupling(1)
    with pytest.raises(ValueError, match="coupling must be 'affine' or 'additive'"):
        fnn.FlowStep(4, coupling="spline")
    with pytest.raises(ValueError, match="divisible by 2\\*\\*levels = 8"):
        flowkern.Glow(3, 12, levels=3)
    with pytest.raises(ValueError, match="divisible by 2\\*\\*\\(scales - 1\\)"):
        flowkern.RealNVP(3, 6, scales=3)


def test_functional_ops_check_shapes():
    x = torch.randn(2, 5, 3, 3)
    with pytest.raises(ValueError, match=r"h must have shape \(2, 4, 3, 3\) for a channel-mask sigmoid"):
        F.coupling_forward(x, torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match=r"h must have shape \(2, 10, 3, 3\) for a checkerboard-mask exp"):
        F.coupling_inverse(x, torch.randn(2, 4, 3, 3), mask="checkerboard", scale="exp")
    with pytest.raises(TypeError, match="dtype"):
        F.coupling_forward(x, torch.randn(2, 4, 3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"log_scale must have shape \(5,\)"):
        F.actnorm_forward(x, torch.zeros(4), torch.zeros(5))
    with pytest.raises(ValueError, match=r"weight must have shape \(C_out, 5\)"):
        F.conv1x1(x, torch.randn(5, 4))


def test_models_check_inputs():
    model = flowkern.Glow(3, 8, levels=2, steps=1, hidden_channels=4)
    with pytest.raises(ValueError, match="must have 3 channels"):
        model(torch.randn(2, 1, 8, 8))
    for size in (6, 16):  # the model samples 8×8 images: it takes no other size
        with pytest.raises(ValueError, match=r"Glow\(image_size=8\) takes images of 8×8"):
            model(torch.randn(2, 3, size, size))
    with pytest.raises(ValueError, match="list of 2 latents"):
        model.inverse(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"shape \(N, 2\)"):
        flowkern.RealNVP2d()(torch.randn(4, 3))


MODELS = {
    "glow": (lambda: flowkern.Glow(3, 8, levels=2, steps=2, hidden_channels=4), (3, 8, 8)),
    "realnvp": (lambda: flowkern.RealNVP(3, 8, scales=2, hidden_channels=4, blocks=1), (3, 8, 8)),
    "realnvp2d": (lambda: flowkern.RealNVP2d(hidden=4, layers=2), (2,)),
}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_an_empty_batch_gives_empty_results(name, training):
    factory, shape = MODELS[name]
    model = factory().train(training)
    x = torch.rand(0, *shape) - 0.5
    zs, logdet = model(x)
    assert logdet.shape == (0,) and model.log_prob(x).shape == (0,) and model.bits_per_dim(x, 256).shape == (0,)
    latents = zs if isinstance(zs, list) else [zs]
    assert [z.shape[1:] for z in latents] == [torch.Size(s) for s in model.latent_shapes()]
    assert all(z.shape[0] == 0 for z in latents)
    assert model.inverse(zs).shape == (0, *shape)
    assert model.sample(0).shape == (0, *shape)
    actnorms = [m for m in model.modules() if isinstance(m, fnn.ActNorm)]
    assert not any(bool(m.initialized) for m in actnorms)  # nothing to initialise from
    model.train()(torch.rand(4, *shape) - 0.5)
    assert all(bool(m.initialized) for m in actnorms)


@pytest.mark.parametrize("name", MODELS)
def test_model_arguments_get_clear_errors(name):
    factory, shape = MODELS[name]
    model = factory()
    with pytest.raises(ValueError, match="n must be at least 0, got -1"):
        model.sample(-1)
    with pytest.raises(TypeError, match="n must be an int, got 2.5"):
        model.sample(2.5)
    for temperature in (-0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
            model.sample(2, temperature=temperature)
    assert model.sample(2, temperature=0).shape == (2, *shape)  # every latent at its mean
    with pytest.raises(ValueError, match="n_bins must be at least 1, got 0"):
        model.bits_per_dim(torch.rand(2, *shape), n_bins=0)


def test_model_sizes_are_checked():
    for build, message in [(lambda: flowkern.Glow(3, 8, 2, 2, hidden_channels=0), "hidden_channels must be at least 1"),
                           (lambda: flowkern.Glow(3, 8, 2, steps=0), "steps must be at least 1"),
                           (lambda: flowkern.RealNVP(3, 8, 2, hidden_channels=0), "hidden_channels must be at least"),
                           (lambda: flowkern.RealNVP2d(hidden=0), "hidden must be at least 1"),
                           (lambda: flowkern.RealNVP2d(dim=1), "dim must be at least 2")]:
        with pytest.raises(ValueError, match=message):
            build()
    with pytest.raises(TypeError, match="levels must be an int"):
        flowkern.Glow(3, 8, levels=2.0)


@pytest.mark.parametrize("build, error, message", [
    (lambda: flowkern.Glow(3, 8, 2, 1, hidden_channels=4, lu="no"), TypeError, "lu must be True or False, got 'no'"),
    (lambda: flowkern.Glow(3, 8, 2, 1, hidden_channels=4, learn_prior=1), TypeError, "learn_prior must be True"),
    (lambda: flowkern.FFJORD(2, adjoint="no"), TypeError, "adjoint must be True or False"),
    (lambda: flowkern.FFJORD(2, time="1"), TypeError, "time must be a real number, got '1'"),
    (lambda: flowkern.FFJORD(2, kinetic="a"), TypeError, "kinetic must be a real number"),
    (lambda: flowkern.FFJORD(2, method="bogus"), ValueError, "method must be one of 'dopri5'"),
    (lambda: flowkern.FFJORD(2, rtol=-1), ValueError, "rtol must be a finite number > 0, got -1"),
    (lambda: flowkern.FFJORD(2, atol=float("nan")), ValueError, "atol must be a finite number > 0"),
    (lambda: flowkern.FFJORD(2.5), TypeError, "shape .* must be an int"),
    (lambda: flowkern.RealNVP(3, 8, 2, bound=float("nan")), ValueError, "bound must be a finite number > 0"),
    (lambda: flowkern.RealNVP(3, 8, 2, bound=-2), ValueError, "bound must be a finite number > 0, got -2"),
    (lambda: flowkern.RealNVP(3, 8, 2, bound="2"), TypeError, "bound must be a real number, got '2'"),
    (lambda: fnn.ActNorm(0), ValueError, "channels must be at least 1, got 0"),
    (lambda: fnn.Squeeze(0), ValueError, "factor must be at least 1, got 0"),
    (lambda: fnn.InvConv1x1(0), ValueError, "channels must be at least 1"),
    (lambda: fnn.AffineCoupling(4, hidden_channels=0), ValueError, "hidden_channels must be at least 1"),
    (lambda: fnn.FlowSequential(torch.nn.ReLU()), TypeError, "takes flow layers .* ReLU has no inverse"),
])
def test_constructors_refuse_what_they_cannot_build(build, error, message):
    with pytest.raises(error, match=message):
        build()


def test_ffjord_takes_an_int_shape_and_empty_or_non_finite_batches():
    model = flowkern.FFJORD(2, hidden=8, depth=1)
    assert model.shape == (2,)
    assert model.sample(0).shape == (0, 2) and model.log_prob(torch.zeros(0, 2)).shape == (0,)
    x = torch.randn(5, 2)
    x[1, 0], x[3, 1] = float("nan"), float("inf")
    log_prob = model.log_prob(x)
    finite = torch.tensor([True, False, True, False, True])
    assert log_prob[~finite].isnan().all()
    torch.testing.assert_close(log_prob[finite], model.log_prob(x[finite]), rtol=1e-4, atol=1e-5)
    z = torch.randn(3, 2)
    z[2] = float("nan")
    x = model.inverse(z)
    assert x[2].isnan().all() and torch.isfinite(x[:2]).all()


def test_temperatures_of_numpy_and_tensor_scalars():
    import numpy as np

    model = flowkern.Glow(3, 8, 2, 1, hidden_channels=4).eval()
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    expected = model.sample(3, temperature=0.5, generator=gen())
    for temperature in (np.float32(0.5), np.float64(0.5), torch.tensor(0.5)):
        assert torch.equal(model.sample(3, temperature=temperature, generator=gen()), expected)
    with pytest.raises(ValueError, match="temperature must be"):
        model.sample(3, temperature=torch.tensor([0.5, 0.5]))


def test_bits_per_dim_counts_levels_only_for_images():
    points = torch.randn(4, 2)
    model = flowkern.RealNVP2d(hidden=4, layers=2)
    torch.testing.assert_close(model.bits_per_dim(points), model.bits_per_dim(points, None))
    torch.testing.assert_close(model.bits_per_dim(points), -model.log_prob(points) / (2 * math.log(2)))
    glow = flowkern.Glow(3, 8, 2, 1, hidden_channels=4).eval()
    images = torch.rand(2, 3, 8, 8) - 0.5
    torch.testing.assert_close(glow.bits_per_dim(images), glow.bits_per_dim(images, 256))


def test_actnorm_refuses_to_initialise_from_non_finite_data():
    model = flowkern.Glow(3, 8, 2, 1, hidden_channels=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(4, 3, 8, 8) - 0.5
    for bad in (float("nan"), float("inf")):
        poisoned = x.clone()
        poisoned[2, 1, 3, 3] = bad
        with pytest.raises(ValueError, match=r"ActNorm\(12\) initialises from its first training batch, which "
                                             "holds NaN or inf"):
            model(poisoned)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # still uninitialised
    zs, logdet = model(x)
    assert torch.isfinite(logdet).all() and all(bool(m.initialized) for m in model.modules()
                                                if isinstance(m, fnn.ActNorm))


@pytest.mark.parametrize("name", ["glow", "realnvp", "realnvp2d"])
def test_sampling_a_fresh_model_in_training_mode_changes_nothing(name):
    model = MODELS[name][0]().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    samples = model.sample(4)
    assert model.training and torch.isfinite(samples).all()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    zs = [torch.randn(4, *s) for s in model.latent_shapes()]
    if any(isinstance(m, fnn.ActNorm) for m in model.modules()):  # an inverse would initialise from latents
        with pytest.raises(RuntimeError, match="conditioner's ActNorm is not initialised yet; run a forward pass"):
            model.inverse(zs if model.multi_scale else zs[0])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
