"""flowkern.accelerate against the real nflows: its affine and additive couplings (every mask the fused coupling
covers, vectors and images, with a context), ActNorm, LULinear and OneByOneConvolution, and whole flows of them
(vectors and images), on perturbed parameters, both directions, in float64 (outputs and log-dets to 1e-10
relative, parameter gradients to 1e-8) and float32; checkpoints both ways; what is left alone and why; graph
breaks under torch.compile."""
import pytest
import torch

import flowkern
from flowkern.dropin import acceleration_report

from peer_conformance import (F32, F32_GRAD, accelerated_copy, assert_accelerated, assert_same_map, flat, peer,
                              perturb)

nflows = peer("nflows")
from nflows.distributions.normal import StandardNormal  # noqa: E402
from nflows.flows.base import Flow  # noqa: E402
from nflows.nn import nets  # noqa: E402
from nflows.transforms import (ActNorm, AdditiveCouplingTransform, AffineCouplingTransform,  # noqa: E402
                               CompositeTransform, LULinear, OneByOneConvolution, RandomPermutation)
from nflows.transforms.reshape import SqueezeTransform  # noqa: E402
from nflows.utils.torchutils import create_alternating_binary_mask, create_mid_split_binary_mask  # noqa: E402


def transform_net(image, context_features=None):
    """The conditioner nflows' examples build: a residual network over features or channels."""
    def create(n_in, n_out):
        if image:
            return nets.ConvResidualNet(n_in, n_out, hidden_channels=8, context_channels=context_features,
                                        num_blocks=1)
        return nets.ResidualNet(n_in, n_out, hidden_features=16, context_features=context_features, num_blocks=1)
    return create


def masks(features):
    """nflows' mid-split mask (the first ⌈D/2⌉ transformed) and its complement (the rest)."""
    mid = create_mid_split_binary_mask(features)
    return {"mid split": mid, "complement": 1 - mid}


def calls(context=None):
    return [lambda m, v: m(v, context), lambda m, v: m.inverse(v, context)]


COUPLINGS = {"affine": AffineCouplingTransform, "additive": AdditiveCouplingTransform}


@pytest.mark.parametrize("mask", ["mid split", "complement"])
@pytest.mark.parametrize("kind", COUPLINGS)
@pytest.mark.parametrize("shape", [(3, 7), (3, 5, 4, 3)])
def test_nflows_couplings(each_backend, kind, mask, shape):
    torch.manual_seed(0)
    coupling = COUPLINGS[kind](masks(shape[1])[mask], transform_net(len(shape) == 4))
    original, accelerated = accelerated_copy(perturb(coupling.double()))
    assert_accelerated(accelerated, 1)
    assert acceleration_report(accelerated)[0].kind == f"nflows.transforms.coupling.{COUPLINGS[kind].__name__}"
    x = torch.randn(*shape, dtype=torch.float64)
    for call in calls():
        assert_same_map(original, accelerated, call, [x])


def test_nflows_coupling_with_a_context():
    """The context only feeds the transform network, as in nflows."""
    torch.manual_seed(0)
    coupling = AffineCouplingTransform(masks(6)["mid split"], transform_net(False, context_features=3))
    original, accelerated = accelerated_copy(perturb(coupling.double()))
    x, context = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    for inverse in (False, True):
        assert_same_map(original, accelerated, lambda m, v, c: (m.inverse if inverse else m)(v, c), [x, context])


@pytest.mark.parametrize("shape", [(6, 5), (4, 3, 4, 5)])
def test_nflows_actnorm(shape):
    """The first forward in training mode initialises, with nflows' estimator; then both directions."""
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64) * 2 + 0.5
    original, accelerated = accelerated_copy(ActNorm(shape[1]).double())
    for got, want in zip(flat(accelerated(x)), flat(original(x))):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert bool(accelerated.initialized)
    perturb(original)
    accelerated.load_state_dict(original.state_dict())
    for call in calls():
        assert_same_map(original, accelerated, call, [x])
    fresh = flowkern.accelerate(ActNorm(shape[1]).double().eval())
    fresh(x)  # in evaluation mode nothing is initialised
    assert not bool(fresh.initialized) and not fresh.log_scale.any()


@pytest.mark.parametrize("identity_init", [True, False])
def test_nflows_lu_linear_and_one_by_one_convolution(each_backend, identity_init):
    """W = L·U with nflows' softplus diagonal and its bias, both directions; the 1×1 convolution with its fixed
    permutation folded into W."""
    torch.manual_seed(0)
    for module, shape in ((LULinear(7, identity_init=identity_init), (5, 7)),
                          (OneByOneConvolution(6, identity_init=identity_init), (3, 6, 4, 5))):
        original, accelerated = accelerated_copy(perturb(module.double()))
        assert_accelerated(accelerated, 1)
        x = torch.randn(*shape, dtype=torch.float64)
        for call in calls():
            assert_same_map(original, accelerated, call, [x])
        assert list(accelerated.state_dict()) == list(original.state_dict())


def test_nflows_lu_linear_over_images_runs_its_own_code():
    """nflows' LULinear mixes the last dimension of a 4-D input (F.linear) and cannot invert one: that stays
    nflows' code, errors included."""
    torch.manual_seed(0)
    original, accelerated = accelerated_copy(perturb(LULinear(5).double()))
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    assert_same_map(original, accelerated, lambda m, v: m(v), [x])
    for module in (original, accelerated):
        with pytest.raises(RuntimeError, match="t\\(\\) expects a tensor with <= 2 dimensions"):
            module.inverse(x)


def _nflows_image_flow(channels=3, size=8, steps=2):
    """A Glow-like flow of nflows' layers: squeeze, then ActNorm, 1×1 convolution and affine coupling steps."""
    transforms, c = [SqueezeTransform()], channels * 4
    for i in range(steps):
        mask = create_mid_split_binary_mask(c)
        transforms += [ActNorm(c), OneByOneConvolution(c),
                       AffineCouplingTransform(mask if i % 2 == 0 else 1 - mask, transform_net(True))]
    return Flow(CompositeTransform(transforms), StandardNormal([c, size // 2, size // 2]))


def test_nflows_image_flow():
    torch.manual_seed(0)
    flow = _nflows_image_flow().double()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    flow.log_prob(x)  # ActNorm's initialisation
    original, accelerated = accelerated_copy(perturb(flow))
    assert_accelerated(accelerated, 6)
    assert_same_map(original, accelerated, lambda m, v: m.log_prob(v), [x])
    original.load_state_dict(accelerated.state_dict())


def _nflows_flow(features=6, layers=3):
    """A RealNVP-style flow as nflows' README builds one, with ActNorm between its couplings."""
    transforms = []
    for i in range(layers):
        transforms.append(ActNorm(features))
        mask = create_mid_split_binary_mask(features)
        transforms.append(AffineCouplingTransform(mask if i % 2 == 0 else 1 - mask, transform_net(False)))
        transforms.append(RandomPermutation(features))
    return Flow(CompositeTransform(transforms), StandardNormal([features]))


def test_nflows_whole_flow_log_prob_sampling_and_checkpoints():
    torch.manual_seed(0)
    flow = _nflows_flow().double()
    x = torch.randn(8, 6, dtype=torch.float64) * 1.5
    flow.log_prob(x)  # ActNorm's initialisation
    original, accelerated = accelerated_copy(perturb(flow))
    assert_accelerated(accelerated, 6)
    assert_same_map(original, accelerated, lambda m, v: m.log_prob(v), [x])
    original.eval(), accelerated.eval()
    samples = []
    torch.set_default_dtype(torch.float64)  # nflows' StandardNormal draws in the default dtype
    try:
        for model in (original, accelerated):
            torch.manual_seed(3)
            with torch.no_grad():
                samples.append(model.sample(5))
    finally:
        torch.set_default_dtype(torch.float32)
    torch.testing.assert_close(samples[1], samples[0], rtol=1e-10, atol=1e-10)
    state = accelerated.state_dict()
    assert list(state) == list(original.state_dict())
    original.load_state_dict(state)
    accelerated.load_state_dict(original.state_dict())


def test_nflows_float32_within_tolerance():
    torch.manual_seed(0)
    flow = _nflows_flow()
    x = torch.randn(16, 6) * 1.5
    flow.log_prob(x)
    original, accelerated = accelerated_copy(perturb(flow))
    assert_same_map(original, accelerated, lambda m, v: m.log_prob(v), [x], tol=F32, grad_tol=F32_GRAD)


def test_nflows_left_alone_with_reasons():
    alternating = AffineCouplingTransform(create_alternating_binary_mask(6), transform_net(False))
    unconditional = AffineCouplingTransform(masks(6)["mid split"], transform_net(False),
                                            unconditional_transform=lambda features: ActNorm(features))
    for module, reason in ((alternating, "splits at ceil(D/2)"), (unconditional, "unconditional transform")):
        flowkern.accelerate(module)
        entry = next(e for e in acceleration_report(module) if e.name == "")
        assert not entry.accelerated and reason in entry.how, entry
        assert type(module) is AffineCouplingTransform


@pytest.mark.parametrize("build,shape", [(_nflows_flow, (8, 6)), (_nflows_image_flow, (4, 3, 8, 8))])
def test_accelerated_nflows_flow_compiles_without_graph_breaks(build, shape):
    torch.manual_seed(0)
    flow = build()
    x = torch.randn(*shape)
    flow.log_prob(x)
    original, accelerated = accelerated_copy(perturb(flow))
    breaks = {name: torch._dynamo.explain(lambda v, m=m: m.log_prob(v))(x).graph_break_count
              for name, m in (("nflows", original), ("accelerated", accelerated))}
    print(breaks)
    assert breaks["accelerated"] == 0
    compiled = torch.compile(lambda v: accelerated.log_prob(v), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), original.log_prob(x), rtol=1e-5, atol=1e-5)


def test_bad_input_gets_nflows_errors():
    coupling = flowkern.accelerate(AffineCouplingTransform(masks(6)["mid split"], transform_net(False)))
    with pytest.raises(ValueError, match="Inputs must be a 2D or a 4D tensor"):
        coupling(torch.randn(2, 6, 3))
    with pytest.raises(ValueError, match="Expected features = 6, got 5"):
        coupling(torch.randn(2, 5))
    with pytest.raises(ValueError, match="Expecting inputs to be a 2D or a 4D tensor"):
        flowkern.accelerate(ActNorm(6))(torch.randn(2, 6, 3))
