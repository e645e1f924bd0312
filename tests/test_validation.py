"""Bad input gets ValueError/TypeError with a message that says what was expected."""
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
