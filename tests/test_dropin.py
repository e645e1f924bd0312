"""flowkern.accelerate against the real normflows and FrEIA: every recognised module and option, and whole
models as their documentation builds them, on perturbed parameters, both directions, in float64 (outputs and
log-dets to 1e-10 relative, parameter gradients to 1e-8) and float32; checkpoints both ways; what is left
alone and why; graph breaks under torch.compile."""
import copy

import pytest
import torch
from torch import nn

import flowkern
from flowkern.dropin import acceleration_report

from fused_backends import whole_model_backends
from peer_conformance import (F32, F32_GRAD, F32_MODEL, F64, peer, accelerated_copy, assert_accelerated,
                              assert_same_map, directions, flat, perturb)


nf = peer("normflows")
FrEIA = peer("FrEIA")
Fm = pytest.importorskip("FrEIA.modules")
Ff = pytest.importorskip("FrEIA.framework")

# --- normflows -------------------------------------------------------------------------------------------------

def _normflows_glow(levels=2, steps=2, channels=3, size=8, hidden=16, **block):
    """A Glow as normflows' documentation builds it (examples/glow.ipynb), unconditional."""
    q0, flows, merges = [], [], []
    for i in range(levels):
        flows.append([nf.flows.GlowBlock(channels * 2 ** (levels + 1 - i), hidden, **block) for _ in range(steps)]
                     + [nf.flows.Squeeze()])
        if i > 0:
            merges.append(nf.flows.Merge())
            latent = (channels * 2 ** (levels - i), size // 2 ** (levels - i), size // 2 ** (levels - i))
        else:
            latent = (channels * 2 ** (levels + 1), size // 2 ** levels, size // 2 ** levels)
        q0.append(nf.distributions.DiagGaussian(latent))
    return nf.MultiscaleFlow(q0, flows, merges, class_cond=False)


@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_normflows_actnorm(direction):
    """The data-dependent initialisation of either direction (normflows' estimator), then the map."""
    torch.set_default_dtype(torch.float64)
    try:
        x = torch.randn(4, 5, 3, 6) * 3 + 1
        original, accelerated = accelerated_copy(nf.flows.ActNorm((5, 1, 1)))
        first = [getattr(m, direction)(x) for m in (original, accelerated)]
        for got, want in zip(flat(first[1]), flat(first[0])):
            torch.testing.assert_close(got, want, **F64)
        torch.testing.assert_close(accelerated.s, original.s, **F64)
        torch.testing.assert_close(accelerated.t, original.t, **F64)
        assert accelerated.data_dep_init_done == 1
        perturb(original)
        accelerated.load_state_dict(original.state_dict())
        for call in directions(original):
            assert_same_map(original, accelerated, call, [x])
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("use_lu", [True, False])
def test_normflows_invertible_1x1_conv(use_lu):
    original, accelerated = accelerated_copy(perturb(nf.flows.Invertible1x1Conv(6, use_lu).double()))
    x = torch.randn(3, 6, 5, 4, dtype=torch.float64)
    for call in directions(original):
        assert_same_map(original, accelerated, call, [x])


def _coupling_block(channels, scale, scale_map, split_mode, hidden=8):
    block = nf.flows.GlowBlock(channels, hidden, scale=scale, scale_map=scale_map, split_mode=split_mode)
    return perturb(block.flows[0].double())


@pytest.mark.parametrize("split_mode", ["channel", "channel_inv"])
@pytest.mark.parametrize("scale,scale_map", [(True, "sigmoid"), (True, "sigmoid_inv"), (True, "exp"),
                                             (False, "sigmoid")])
def test_normflows_affine_coupling_block(each_backend, scale, scale_map, split_mode):
    """Every scale map and channel split mode (odd C: the halves differ), on every backend."""
    original, accelerated = accelerated_copy(_coupling_block(5, scale, scale_map, split_mode))
    assert_accelerated(accelerated, 2)  # the coupling and its ConvNet2d
    x = torch.randn(2, 5, 4, 3, dtype=torch.float64)
    for call in directions(original):
        assert_same_map(original, accelerated, call, [x])


def test_normflows_coupling_block_over_vectors():
    """An AffineCouplingBlock over (N, D) with an MLP param_map (normflows' RealNVP for vectors)."""
    mlp = nf.nets.MLP([2, 16, 2 * 3], init_zeros=False)  # channel_inv of 5: passes 2, transforms 3
    block = nf.flows.AffineCouplingBlock(mlp, scale=True, scale_map="exp", split_mode="channel_inv").double()
    original, accelerated = accelerated_copy(block)
    x = torch.randn(7, 5, dtype=torch.float64)
    for call in directions(original):
        assert_same_map(original, accelerated, call, [x])


@pytest.mark.parametrize("form", flowkern.nn.GlowConditioner.FORMS)
def test_normflows_convnet_in_each_form(form, monkeypatch):
    """The ConvNet2d conditioner in each form (forced), the same map and gradients as its own layers."""
    calls = []
    monkeypatch.setattr("flowkern.dropin._common.conditioner_form", lambda *args: calls.append(1) or form)
    net = perturb(nf.nets.ConvNet2d((3, 32, 32, 4), (3, 1, 3), init_zeros=True).double())
    original, accelerated = accelerated_copy(net)
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    assert_same_map(original, accelerated, lambda m, v: m(v), [x])
    assert calls, "the form was asked for"


@pytest.mark.parametrize("backend_name", whole_model_backends(["reference", "native", "triton"]))
def test_normflows_glow_block(backend_name):
    """The whole GlowBlock, its ActNorm and 1×1 conv folded into one convolution: both directions."""
    with flowkern.use_backend(backend_name):
        torch.manual_seed(0)
        block = nf.flows.GlowBlock(6, 16).double()
        x = torch.randn(3, 6, 4, 4, dtype=torch.float64)
        block.inverse(x)  # ActNorm's initialisation
        original, accelerated = accelerated_copy(perturb(block))
        assert accelerated._folds()
        for call in directions(original):
            assert_same_map(original, accelerated, call, [x])


@pytest.mark.parametrize("scale_map", ["sigmoid", "exp"])
def test_normflows_glow_whole_model(scale_map):
    """normflows' documentation Glow: log-likelihood and its gradients, sampling with a seed, in float64."""
    torch.manual_seed(0)
    model = _normflows_glow(scale_map=scale_map).double()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    model.log_prob(x, None)  # ActNorm's initialisation
    original, accelerated = accelerated_copy(perturb(model, 0.05))
    assert_accelerated(accelerated, 4 * 5)
    assert_same_map(original, accelerated, lambda m, v: m.log_prob(v, None), [x])
    samples = []
    for m in (original, accelerated):
        torch.manual_seed(3)
        with torch.no_grad():
            samples.append(m.sample(5))
    for got, want in zip(flat(samples[1]), flat(samples[0])):
        torch.testing.assert_close(got, want, **F64)


def test_normflows_glow_float32():
    """float32: the ActNorm initialisation done by each model on its first batch, then the loss and the
    gradients of every parameter within float32's tolerances."""
    torch.manual_seed(0)
    original = _normflows_glow()
    accelerated = flowkern.accelerate(copy.deepcopy(original))
    x = torch.rand(8, 3, 8, 8) - 0.5
    with torch.no_grad():
        torch.testing.assert_close(accelerated.forward_kld(x), original.forward_kld(x), **F32)
    perturb(original, 0.05)
    accelerated.load_state_dict(original.state_dict())
    assert_same_map(original, accelerated, lambda m, v: m.forward_kld(v), [x], tol=F32_MODEL, grad_tol=F32_GRAD)


def test_accelerate_keeps_parameters_buffers_and_checkpoints():
    torch.manual_seed(0)
    model = _normflows_glow()
    model.log_prob(torch.randn(2, 3, 8, 8), None)
    params, buffers = list(model.parameters()), list(model.buffers())
    keys = list(model.state_dict())
    optimizer = torch.optim.Adam(model.parameters())
    assert flowkern.accelerate(model) is model
    assert all(a is b for a, b in zip(model.parameters(), params)) and len(list(model.parameters())) == len(params)
    assert all(a is b for a, b in zip(model.buffers(), buffers))
    assert list(model.state_dict()) == keys
    assert isinstance(model.flows[0][0], nf.flows.GlowBlock)
    model.forward_kld(torch.randn(2, 3, 8, 8)).backward()
    optimizer.step()  # the optimiser built before accelerate still holds the parameters
    # checkpoints both ways
    torch.manual_seed(1)
    fresh = _normflows_glow()
    fresh.load_state_dict(model.state_dict())
    fresh_accelerated = flowkern.accelerate(_normflows_glow())
    fresh_accelerated.load_state_dict(fresh.state_dict())
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(fresh_accelerated.log_prob(x, None), model.log_prob(x, None))
    torch.testing.assert_close(fresh.log_prob(x, None), model.log_prob(x, None), **F32)


def test_accelerate_twice_changes_nothing_and_leaves_unknown_modules():
    torch.manual_seed(0)
    inner = _normflows_glow(levels=1, steps=1)
    model = nn.Sequential(nn.Linear(2, 2), inner)
    flowkern.accelerate(model)
    classes = [type(m) for m in model.modules()]
    flowkern.accelerate(model)
    assert [type(m) for m in model.modules()] == classes
    assert type(model[0]) is nn.Linear and type(model) is nn.Sequential
    with pytest.raises(TypeError, match="torch.nn.Module"):
        flowkern.accelerate("a model")


def test_the_report_says_what_is_left_alone_and_why(capsys):
    class MyActNorm(nf.flows.ActNorm):
        pass

    checkerboard = nf.flows.GlowBlock(4, 8, split_mode="checkerboard")
    leaky = nf.flows.GlowBlock(4, 8, leaky=0.1)
    model = nn.ModuleList([checkerboard, leaky, MyActNorm((4, 1, 1)), nf.flows.ActNorm((4,))])
    flowkern.accelerate(model, report=True)
    printed = capsys.readouterr().out
    report = {e.name: e for e in acceleration_report(model)}
    assert "checkerboard" in report["0.flows.0"].how and not report["0.flows.0"].accelerated
    assert "leaky" in report["1.flows.0.flows.1.param_map"].how
    assert report["1.flows.0"].accelerated  # its coupling runs fused; the conditioner keeps its own layers
    assert "subclass" in report["2"].how and type(model[2]) is MyActNorm
    assert "(1, C, 1, 1)" in report["3"].how
    assert "left alone" in printed and "accelerated" in printed


def test_accelerated_normflows_glow_compiles_without_graph_breaks():
    """The log-likelihood of the accelerated documentation Glow under torch.compile: no graph break, where
    the original has them (its ActNorm's flag read on the host)."""
    torch.manual_seed(0)
    model = _normflows_glow(levels=1, steps=2)
    x = torch.randn(2, 3, 8, 8)
    model.log_prob(x, None)
    accelerated = flowkern.accelerate(copy.deepcopy(model))
    breaks = {}
    for name, m in (("normflows", model), ("accelerated", accelerated)):
        torch._dynamo.reset()
        breaks[name] = torch._dynamo.explain(lambda v: m.log_prob(v, None))(x).graph_break_count
    print("graph breaks", breaks)
    assert breaks["accelerated"] == 0 and breaks["normflows"] > 0
    compiled = torch.compile(lambda v: accelerated.log_prob(v, None), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), accelerated.log_prob(x, None))
    # a checkpoint loaded into a fresh accelerated model and compiled at once: its ActNorms are not initialised again
    torch._dynamo.reset()
    fresh = flowkern.accelerate(_normflows_glow(levels=1, steps=2))
    fresh.load_state_dict(model.state_dict())
    loaded = torch.compile(lambda v: fresh.log_prob(v, None), fullgraph=True, backend="eager")
    torch.testing.assert_close(loaded(2 * x), model.log_prob(2 * x, None))


# --- FrEIA -----------------------------------------------------------------------------------------------------

def _conv_subnet(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, c_out, 3, padding=1))


def _glow_subnet(c_in, c_out):
    """Glow's conditioner, which the accelerated blocks run in the fastest form measured."""
    return nn.Sequential(nn.Conv2d(c_in, 9 * c_out, 3, padding=1), nn.ReLU(), nn.Conv2d(9 * c_out, 9 * c_out, 1),
                         nn.ReLU(), nn.Conv2d(9 * c_out, c_out, 3, padding=1))


def _dense_subnet(c_in, c_out):
    return nn.Sequential(nn.Linear(c_in, 16), nn.ReLU(), nn.Linear(16, c_out))


def freia_calls():
    return [lambda m, v: m([v]), lambda m, v: m([v], rev=True)]


@pytest.mark.parametrize("block_class", ["GLOWCouplingBlock", "AffineCouplingOneSided"])
@pytest.mark.parametrize("clamp_activation", ["ATAN", "TANH"])
@pytest.mark.parametrize("dims,subnet", [((6, 4, 5), _conv_subnet), ((6, 4, 5), _glow_subnet), ((7,), _dense_subnet)])
def test_freia_couplings(each_backend, block_class, clamp_activation, dims, subnet):
    torch.manual_seed(0)
    block = getattr(Fm, block_class)([dims], subnet_constructor=subnet, clamp=1.7, clamp_activation=clamp_activation)
    original, accelerated = accelerated_copy(perturb(block.double()))
    assert_accelerated(accelerated, 1)
    assert acceleration_report(accelerated)[0].kind == f"{type(block).__module__}.{block_class}"
    x = torch.randn(3, *dims, dtype=torch.float64)
    for call in freia_calls():
        assert_same_map(original, accelerated, call, [x])


def test_freia_conditional_coupling():
    """Conditions (dims_c) only feed the subnetworks."""
    torch.manual_seed(0)
    block = Fm.GLOWCouplingBlock([(4, 3, 3)], dims_c=[(2, 3, 3)], subnet_constructor=_conv_subnet)
    original, accelerated = accelerated_copy(perturb(block.double()))
    x, c = torch.randn(2, 4, 3, 3, dtype=torch.float64), torch.randn(2, 2, 3, 3, dtype=torch.float64)
    for rev in (False, True):
        assert_same_map(original, accelerated, lambda m, v, cond: m([v], c=[cond], rev=rev), [x, c])


@pytest.mark.parametrize("dims", [(5, 3, 4), (6,)])
def test_freia_actnorm(dims):
    torch.manual_seed(0)
    x = torch.randn(4, *dims, dtype=torch.float64) * 2 + 0.5
    original, accelerated = accelerated_copy(Fm.ActNorm([dims]).double())
    for got, want in zip(flat(accelerated([x])), flat(original([x]))):  # the first batch initialises
        torch.testing.assert_close(got, want, **F64)
    perturb(original)
    accelerated.load_state_dict(original.state_dict())
    for call in freia_calls():
        assert_same_map(original, accelerated, call, [x])


def _freia_image_inn(dims=(4, 8, 8), blocks=3):
    inn = Ff.SequenceINN(*dims)
    for _ in range(blocks):
        inn.append(Fm.ActNorm)
        inn.append(Fm.GLOWCouplingBlock, subnet_constructor=_conv_subnet, clamp=2.0)
        inn.append(Fm.PermuteRandom)
    return inn


def _freia_dense_inn(dim=6, blocks=3):
    inn = Ff.SequenceINN(dim)
    for _ in range(blocks):
        inn.append(Fm.GLOWCouplingBlock, subnet_constructor=_dense_subnet, clamp_activation="TANH")
        inn.append(Fm.PermuteRandom)
    return inn


@pytest.mark.parametrize("build,shape", [(_freia_image_inn, (3, 4, 8, 8)), (_freia_dense_inn, (5, 6))])
def test_freia_sequence_inn(build, shape):
    torch.manual_seed(0)
    inn = build().double()
    x = torch.randn(*shape, dtype=torch.float64)
    inn(x)  # ActNorm's initialisation
    original, accelerated = accelerated_copy(perturb(inn))
    for rev in (False, True):
        assert_same_map(original, accelerated, lambda m, v: m(v, rev=rev), [x])
    state = accelerated.state_dict()
    assert list(state) == list(original.state_dict())
    original.load_state_dict(state)


@pytest.mark.parametrize("permute_soft", [False, True])
@pytest.mark.parametrize("global_affine_type", ["SOFTPLUS", "SIGMOID", "EXP"])
@pytest.mark.parametrize("dims,subnet", [((5, 4, 3), _conv_subnet), ((5, 4, 3), _glow_subnet), ((6,), _dense_subnet)])
def test_freia_all_in_one_block(each_backend, permute_soft, global_affine_type, dims, subnet):
    torch.manual_seed(0)
    block = Fm.AllInOneBlock([dims], subnet_constructor=subnet, affine_clamping=1.5, permute_soft=permute_soft,
                             global_affine_type=global_affine_type)
    original, accelerated = accelerated_copy(perturb(block.double()))
    assert_accelerated(accelerated, 1)
    x = torch.randn(3, *dims, dtype=torch.float64)
    for call in freia_calls():
        assert_same_map(original, accelerated, call, [x])


def test_freia_conditional_all_in_one_block():
    torch.manual_seed(0)
    block = Fm.AllInOneBlock([(4, 3, 3)], dims_c=[(3, 3, 3)], subnet_constructor=_conv_subnet, permute_soft=True)
    original, accelerated = accelerated_copy(perturb(block.double()))
    x, c = torch.randn(2, 4, 3, 3, dtype=torch.float64), torch.randn(2, 3, 3, 3, dtype=torch.float64)
    for rev in (False, True):
        assert_same_map(original, accelerated, lambda m, v, cond: m([v], c=[cond], rev=rev), [x, c])


@pytest.mark.parametrize("form", flowkern.nn.GlowConditioner.FORMS)
def test_freia_glow_subnet_in_each_form(form, monkeypatch):
    """A Glow-shaped nn.Sequential subnetwork run by the accelerated block in each conditioner form: the same
    map and gradients as FrEIA calling it."""
    monkeypatch.setattr("flowkern.dropin._common.conditioner_form", lambda *args: form)
    torch.manual_seed(0)
    block = Fm.GLOWCouplingBlock([(4, 5, 6)], subnet_constructor=_glow_subnet)
    original, accelerated = accelerated_copy(perturb(block.double()))
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    for call in freia_calls():
        assert_same_map(original, accelerated, call, [x])


def test_accelerated_freia_inn_compiles_without_graph_breaks():
    torch.manual_seed(0)
    inn = _freia_image_inn(blocks=2)
    x = torch.randn(2, 4, 8, 8)
    inn(x)
    accelerated = flowkern.accelerate(copy.deepcopy(inn))
    breaks = {}
    for name, m in (("FrEIA", inn), ("accelerated", accelerated)):
        torch._dynamo.reset()
        breaks[name] = torch._dynamo.explain(lambda v: m(v)[1])(x).graph_break_count
    print("graph breaks", breaks)
    assert breaks["accelerated"] <= breaks["FrEIA"]
    assert breaks["accelerated"] == 0


def test_freia_left_alone_with_reasons():
    blocks = nn.ModuleList([
        Fm.AllInOneBlock([(4, 3, 3)], subnet_constructor=_conv_subnet, learned_householder_permutation=2),
        Fm.RNVPCouplingBlock([(4, 3, 3)], subnet_constructor=_conv_subnet),
        Fm.GLOWCouplingBlock([(4, 3, 3)], subnet_constructor=_conv_subnet, clamp_activation="SIGMOID"),
        Fm.GLOWCouplingBlock([(5, 3, 3)], subnet_constructor=_conv_subnet),  # round(2.5) = 2: not ceil(5/2)
    ])
    flowkern.accelerate(blocks)
    report = acceleration_report(blocks)
    reasons = {e.name: e.how for e in report if not e.accelerated}
    assert set(reasons) == {"0", "1", "2", "3"}, str(report)
    assert "Householder" in reasons["0"] and "separate s and t" in reasons["1"]
    assert "clamp activation" in reasons["2"] and "2 + 3" in reasons["3"]
    assert all(type(b) in (Fm.AllInOneBlock, Fm.RNVPCouplingBlock, Fm.GLOWCouplingBlock) for b in blocks)


def test_freia_float32_within_tolerance():
    """float32 latents as close to the float64 ones as FrEIA's own float32 latents are (three blocks amplify a
    rounding by their conditioners' Lipschitz constants, so a fixed tolerance says little), and parameter
    gradients within float32's tolerance."""
    torch.manual_seed(0)
    inn = _freia_image_inn()
    x = torch.randn(3, 4, 8, 8)
    inn(x)
    original, accelerated = accelerated_copy(perturb(inn))
    truth = copy.deepcopy(original).double()(x.double())[0]
    errors = [(m(x)[0].double() - truth).abs().max().item() for m in (original, accelerated)]
    assert errors[1] <= 4 * errors[0], errors
    assert_same_map(original, accelerated, lambda m, v: m(v)[1], [x], tol=F32_MODEL, grad_tol=F32_GRAD)


def test_accelerated_normflows_glow_keeps_the_flow_math_in_float32_under_autocast():
    """Under torch.autocast (CPU, bfloat16) the accelerated Glow's conditioners run in bfloat16 while its
    couplings, ActNorms, 1×1 convs and log-dets stay float32, as flowkern's own layers: the latents and the
    log-likelihood come back in float32, within the conditioners' rounding of the float32 values, and the LU
    factors' gradients equal float32's (at initialisation they do not depend on the conditioners)."""
    torch.manual_seed(0)
    model = flowkern.accelerate(_normflows_glow())
    x = torch.rand(4, 3, 8, 8) - 0.5
    model.log_prob(x, None)  # ActNorm's initialisation
    convs = [m for m in model.modules() if isinstance(m, nf.flows.Invertible1x1Conv)]
    results = []
    for low in (False, True):
        model.zero_grad()
        with torch.autocast("cpu", torch.bfloat16, enabled=low):
            z, log_det = model.inverse_and_log_det(x)
            log_p = model.log_prob(x, None)
        assert all(t.dtype == torch.float32 for t in (*z, log_det, log_p))
        log_p.sum().backward()
        results.append((log_p.detach(), [c.L.grad.clone() for c in convs]))
    (log_p32, grads32), (log_p16, grads16) = results
    torch.testing.assert_close(log_p16, log_p32, rtol=2 * 2 ** -8, atol=0)
    for got, want in zip(grads16, grads32):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
