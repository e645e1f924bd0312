"""Every layer: round trip, log-det against the brute-force Jacobian, state and initialisation."""
import pytest
import torch
from torch import nn

import flowkern
import flowkern.nn as fnn
from helpers import bruteforce_logdet, initialize, max_abs, randomize_

COUPLING_VARIANTS = [
    dict(mask=mask, parity=parity, scale=scale)
    for mask in ("channel", "checkerboard") for parity in (0, 1) for scale in ("sigmoid", "exp", "additive")
]


def layer_cases():
    """(id, factory, input shape): every layer and variant, on odd sizes."""
    cases = [
        ("actnorm", lambda: fnn.ActNorm(5), (4, 5, 3, 5)),
        ("invconv-lu", lambda: fnn.InvConv1x1(5, lu=True), (4, 5, 3, 5)),
        ("invconv-plain", lambda: fnn.InvConv1x1(5, lu=False), (4, 5, 3, 5)),
        ("squeeze", lambda: fnn.Squeeze(), (4, 3, 4, 6)),
        ("split-learned", lambda: fnn.Split(5, learn_prior=True), (4, 5, 3, 5)),
        ("split-fixed", lambda: fnn.Split(6, learn_prior=False), (4, 6, 3, 5)),
        ("gaussianize", lambda: fnn.Gaussianize(5), (4, 5, 3, 5)),
        ("flowstep-affine", lambda: fnn.FlowStep(5, 8, "affine"), (4, 5, 3, 5)),
        ("flowstep-additive-plain", lambda: fnn.FlowStep(4, 8, "additive", lu=False), (4, 4, 3, 5)),
    ]
    for v in COUPLING_VARIANTS:
        name = f"coupling-{v['mask']}-{v['parity']}-{v['scale']}"
        cases.append((name, lambda v=v: fnn.AffineCoupling(5, 8, bound=1.5, **v), (4, 5, 3, 5)))
    cases.append(("additive-coupling", lambda: fnn.AdditiveCoupling(5, 8, "checkerboard", 1), (4, 5, 3, 5)))
    cases.append(("coupling-mlp", lambda: fnn.AffineCoupling(
        3, scale="exp", conditioner=lambda i, o: fnn.MLPConditioner(i, o, 16)), (4, 3, 1, 1)))
    cases.append(("coupling-resnet", lambda: fnn.AffineCoupling(
        4, mask="checkerboard", scale="exp", conditioner=lambda i, o: fnn.ResNetConditioner(i, o, 8, 2)),
        (4, 4, 4, 3)))
    return cases


CASES = layer_cases()
IDS = [c[0] for c in CASES]


def prepared(factory, shape, dtype):
    layer = factory().to(dtype)
    x = torch.randn(shape, dtype=dtype) * 1.5 + 0.3
    initialize(layer, x)
    randomize_(layer, 0.03)  # sigmoid scales land in 0.75..0.95: moved, well conditioned
    return layer, torch.randn(shape, dtype=dtype)


@pytest.mark.parametrize("name,factory,shape", CASES, ids=IDS)
def test_round_trip_float32(name, factory, shape):
    layer, x = prepared(factory, shape, torch.float32)
    y, logdet = layer(x)
    assert logdet.shape == (shape[0],) and logdet.dtype == torch.float32
    error = max_abs(layer.inverse(y), x)
    assert error <= 1e-5, f"{name}: max |inverse(forward(x)) − x| = {error:.2e}"
    assert max_abs(y, x) > 1e-3 or name == "split-fixed", "the layer should not be the identity here"


@pytest.mark.parametrize("name,factory,shape", CASES, ids=IDS)
def test_logdet_matches_bruteforce_jacobian(name, factory, shape):
    layer, x = prepared(factory, shape, torch.float64)
    x = x[:2]
    logdet = layer(x)[1]
    assert logdet.dtype == torch.float64
    expected = bruteforce_logdet(lambda v: layer(v)[0], x)
    torch.testing.assert_close(logdet, expected, rtol=1e-9, atol=1e-9)


def test_actnorm_initialisation_standardises_each_channel():
    x = torch.randn(16, 3, 5, 7) * torch.tensor([0.1, 3.0, 20.0]).view(1, 3, 1, 1) + 4.0
    layer = fnn.ActNorm(3)
    y, _ = layer(x)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4, rtol=0)
    assert bool(layer.initialized)


def test_actnorm_initialisation_builds_no_graph():
    x = torch.randn(8, 3, 4, 4, requires_grad=True)
    layer = fnn.ActNorm(3)
    y, _ = layer(x)
    assert layer.log_scale.is_leaf and layer.bias.is_leaf and layer.log_scale.grad_fn is None
    y.sum().backward()
    # were the statistics part of the graph, x.grad would carry their derivative as well
    expected = layer.log_scale.detach().exp().view(1, 3, 1, 1).expand_as(x)
    torch.testing.assert_close(x.grad, expected)


def test_actnorm_is_not_reinitialised_after_load_state_dict():
    layer = fnn.ActNorm(4)
    layer(torch.randn(8, 4, 3, 3) * 5)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    restored = fnn.ActNorm(4)
    restored.load_state_dict(state)
    restored.train()
    other = torch.randn(8, 4, 3, 3) * 0.01 - 7
    restored(other)
    torch.testing.assert_close(restored.log_scale.detach(), state["log_scale"])
    torch.testing.assert_close(restored.bias.detach(), state["bias"])
    fresh = fnn.ActNorm(4)
    fresh(other)
    assert not torch.allclose(fresh.log_scale, restored.log_scale)


def test_actnorm_zero_variance_channel_gives_no_nan():
    x = torch.randn(8, 3, 4, 4)
    x[:, 1] = 2.5
    layer = fnn.ActNorm(3)
    y, logdet = layer(x)
    assert torch.isfinite(y).all() and torch.isfinite(logdet).all()
    assert layer.log_scale[1] == 0
    torch.testing.assert_close(y[:, 1], torch.zeros_like(y[:, 1]))


def test_actnorm_initialises_only_in_training_mode():
    layer = fnn.ActNorm(2).eval()
    x = torch.randn(4, 2, 3, 3) * 3
    y, _ = layer(x)
    assert not bool(layer.initialized) and torch.equal(y, x)


@pytest.mark.parametrize("lu", (True, False))
def test_invconv_state_dict_round_trip(lu):
    layer = randomize_(fnn.InvConv1x1(6, lu=lu))
    restored = fnn.InvConv1x1(6, lu=lu)
    restored.load_state_dict(layer.state_dict())
    x = torch.randn(2, 6, 3, 3)
    assert torch.equal(layer(x)[0], restored(x)[0])
    if lu:
        assert {"perm", "sign"} <= {name for name, _ in layer.named_buffers()}


@pytest.mark.parametrize("lu", (True, False))
def test_invconv_initial_weight_is_a_rotation(lu):
    w = fnn.InvConv1x1(12, lu=lu).weight_matrix().double()
    torch.testing.assert_close(w @ w.T, torch.eye(12, dtype=torch.float64), atol=1e-6, rtol=0)


def test_split_latents_and_fixed_prior():
    x = torch.randn(3, 6, 2, 2)
    (z1, eps), logdet = fnn.Split(6, learn_prior=False)(x)
    assert torch.equal(z1, x[:, :3]) and torch.equal(eps, x[:, 3:]) and torch.all(logdet == 0)
    split = randomize_(fnn.Split(5))
    (z1, eps), _ = split(torch.randn(3, 5, 2, 2))
    assert z1.shape == (3, 3, 2, 2) and eps.shape == (3, 2, 2, 2)


def test_user_conditioner_module_is_used():
    net = nn.Conv2d(2, 4, 3, padding=1)
    layer = fnn.AffineCoupling(4, conditioner=net)
    assert layer.conditioner is net
    x = torch.randn(2, 4, 3, 3)
    y, _ = layer(x)
    assert max_abs(layer.inverse(y), x) < 1e-5


@pytest.mark.parametrize("lu", [True, False], ids=["lu", "plain"])
def test_flow_step_folds_actnorm_into_the_conv_exactly(lu):
    x = torch.randn(4, 6, 5, 7, dtype=torch.float64)
    step = flowkern.nn.FlowStep(6, 8, lu=lu).double()
    step(x)  # initialises ActNorm through the unfolded path
    randomize_(step, 0.05)
    unfolded = flowkern.nn.FlowStep(6, 8, lu=lu, fold_actnorm=False).double()
    unfolded.load_state_dict(step.state_dict())
    xs = [x.clone().requires_grad_() for _ in range(2)]
    (y, logdet), (y_ref, logdet_ref) = step(xs[0]), unfolded(xs[1])
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logdet, logdet_ref, rtol=1e-12, atol=1e-12)
    (y.sum() + logdet.sum()).backward()
    (y_ref.sum() + logdet_ref.sum()).backward()
    torch.testing.assert_close(xs[0].grad, xs[1].grad)
    for (name, p), q in zip(step.named_parameters(), unfolded.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(step.inverse(y), x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(step.inverse(y), unfolded.inverse(y), rtol=1e-12, atol=1e-12)


def test_actnorm_reads_its_buffer_parameters_copied_in_with_the_flag_set_are_kept():
    layer = fnn.ActNorm(3)
    with torch.no_grad():
        layer.log_scale.copy_(torch.tensor([0.1, -0.2, 0.3]))
        layer.bias.copy_(torch.tensor([1.0, 2.0, 3.0]))
        layer.initialized.fill_(True)
    layer.train()(torch.randn(8, 3, 4, 4) * 9)
    torch.testing.assert_close(layer.log_scale.detach(), torch.tensor([0.1, -0.2, 0.3]))
    with torch.no_grad():
        layer.initialized.fill_(False)  # and cleared again: the next training forward initialises
    y, _ = layer(torch.randn(8, 3, 4, 4) * 9 + 1)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)


def test_flow_step_names_its_layers_and_keeps_its_checkpoint_keys():
    """``FlowStep.actnorm``, ``.invconv`` and ``.coupling`` are its three layers; its ``state_dict`` keeps the
    keys of a sequence (``0.``, ``1.``, ``2.``), so checkpoints of either spelling's code load."""
    step = flowkern.nn.FlowStep(4, hidden_channels=8)
    assert (step.actnorm, step.invconv, step.coupling) == (step[0], step[1], step[2])
    keys = list(step.state_dict())
    assert {k.split(".")[0] for k in keys} == {"0", "1", "2"} and "1.lower" in keys and "0.log_scale" in keys
    restored = flowkern.nn.FlowStep(4, hidden_channels=8)
    restored.load_state_dict(step.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(restored.state_dict().values(), step.state_dict().values()))
