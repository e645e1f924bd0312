"""Training by inversion: the same gradients as backprop, activation memory flat in depth, and a clear
warning when an inverse is too ill-conditioned to rebuild activations."""
import pytest
import torch

import flowkern
from benchmarks.measure import profile_call
from flowkern.nn import ReconstructionWarning, memory_saving
from flowkern.nn.memory_saving import rebuild
from helpers import fake_backend, initialize, randomize_
from fused_backends import DEVICE, whole_model_backends

BACKENDS = [name for name, reason in flowkern.available_backends(with_reasons=True).items()
            if reason is None and name != "auto"]


def _grads(model, x, memory_saving, loss_fn):
    model.set_memory_saving(memory_saving, check_reconstruction=1e-3 if memory_saving else None)
    model.zero_grad()
    loss = loss_fn(model, x)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def _assert_same_gradients(model, x, bound, loss_fn=lambda m, v: m.bits_per_dim(v).mean()):
    loss, grads = _grads(model, x, False, loss_fn)
    loss_saving, grads_saving = _grads(model, x, True, loss_fn)
    torch.testing.assert_close(loss_saving, loss, rtol=bound, atol=0)
    assert len(grads) == len(grads_saving)
    for i, (g, e) in enumerate(zip(grads_saving, grads)):
        error = ((g - e).norm() / e.norm()).item()
        assert error <= bound, f"parameter {i}: relative error {error:.2e} > {bound:.0e}"
    for chain in model.chains():
        assert chain.last_reconstruction_error is not None and chain.last_reconstruction_error < 1e-3


def _glow(steps, levels, size, dtype, backend):
    torch.manual_seed(1)
    with flowkern.use_backend(backend):
        x = (torch.rand(8, 3, size, size, dtype=dtype, device=DEVICE) - 0.5)
        model = flowkern.Glow(3, size, levels=levels, steps=steps, hidden_channels=16).to(DEVICE, dtype)
        randomize_(initialize(model, x), 0.01).train()
    return model, x


@pytest.mark.parametrize("backend", whole_model_backends(BACKENDS))
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-4), (torch.float64, 1e-8)])
def test_glow_gradients_equal_backprop(backend, dtype, bound):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("one float32 Glow is enough under the Triton interpreter")
    # K=8, L=3; a small Glow where Triton runs in its interpreter
    steps, levels, size = (8, 3, 16) if backend != "triton" or DEVICE == "cuda" else (2, 2, 8)
    model, x = _glow(steps, levels, size, dtype, backend)
    with flowkern.use_backend(backend):
        _assert_same_gradients(model, x, bound)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_realnvp_gradients_equal_backprop(backend):
    torch.manual_seed(2)
    with flowkern.use_backend(backend):
        x = torch.rand(6, 2, 8, 8, dtype=torch.float64) - 0.5
        model = randomize_(flowkern.RealNVP(2, 8, scales=2, hidden_channels=8, blocks=1).double(), 0.02)
        _assert_same_gradients(model, x, 1e-8)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_realnvp2d_gradients_equal_backprop(backend):
    torch.manual_seed(3)
    with flowkern.use_backend(backend):
        x = torch.randn(64, 3, dtype=torch.float64)
        model = randomize_(flowkern.RealNVP2d(dim=3, hidden=16, layers=6).double(), 0.05)
        _assert_same_gradients(model, x, 1e-8, loss_fn=lambda m, v: -m.log_prob(v).mean())


def test_input_gradient_and_any_chain_of_layers():
    torch.manual_seed(4)
    chain = randomize_(flowkern.nn.FlowSequential(
        *[flowkern.nn.FlowStep(4, 8) for _ in range(3)], flowkern.nn.Squeeze()), 0.02).double()
    x = torch.randn(3, 4, 6, 6, dtype=torch.float64)
    chain(x)  # ActNorm's initialisation
    upstream = torch.randn(3, 16, 3, 3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    grads = []
    for saving in (False, True):
        chain.memory_saving = saving
        v = x.clone().requires_grad_()
        y, logdet = chain(v)
        torch.autograd.backward((y, logdet), upstream)
        grads.append(v.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-12)


def test_autograd_grad_and_a_retained_graph_give_the_gradients_of_backprop():
    torch.manual_seed(8)
    chain = randomize_(flowkern.nn.FlowSequential(*[flowkern.nn.FlowStep(4, 8) for _ in range(3)]), 0.02).double()
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    chain(x)  # ActNorm's initialisation
    params = list(chain.parameters())
    grads = {}
    for saving in (False, True):
        chain.memory_saving = saving
        y, logdet = chain(x)
        loss = y.square().sum() + logdet.sum()
        grads[saving] = [torch.autograd.grad(loss, params, retain_graph=True), torch.autograd.grad(loss, params)]
    for expected, first, second in zip(grads[False][0], *grads[True]):
        torch.testing.assert_close(first, expected, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(second, first, rtol=1e-12, atol=1e-14)  # the second pass rebuilds again


def _peak_mb(steps, memory_saving):
    torch.manual_seed(5)
    x = torch.rand(16, 3, 16, 16) - 0.5
    with flowkern.use_backend("reference"):
        model = flowkern.Glow(3, 16, levels=2, steps=steps, hidden_channels=8, memory_saving=memory_saving)
        initialize(model, x).train()
        return profile_call(lambda: model.bits_per_dim(x).mean().backward(), torch.device("cpu"))["peak_mb"]


def test_activation_memory_stays_flat_as_the_flow_gets_deeper():
    standard = {k: _peak_mb(k, False) for k in (2, 8)}
    saving = {k: _peak_mb(k, True) for k in (2, 8)}
    assert standard[8] > 2.5 * standard[2], standard  # backprop keeps every step's activations
    assert saving[8] <= 1.3 * saving[2], saving       # inversion keeps one step's
    assert saving[8] <= 0.3 * standard[8], (saving, standard)


def test_each_layer_hands_its_parameter_gradients_to_autograd_when_it_is_done(monkeypatch):
    # Held until the whole chain is done, parameter gradients would grow with depth like activations.
    torch.manual_seed(7)
    chain = flowkern.nn.FlowSequential(*[flowkern.nn.FlowStep(4, 8) for _ in range(4)], memory_saving=True)
    x = torch.randn(2, 4, 6, 6)
    chain(x)  # ActNorm's initialisation
    rebuilt = []
    monkeypatch.setattr(memory_saving, "rebuild", lambda layer, y: rebuilt.append(layer) or rebuild(layer, y))
    rebuilt_when_accumulated = {}

    def record(p):
        rebuilt_when_accumulated[p] = len(rebuilt)
    for p in chain.parameters():
        p.register_post_accumulate_grad_hook(record)
    y, logdet = chain(x)
    (y.square().sum() + logdet.sum()).backward()
    names = [type(unit).__name__ for unit in chain.units()]
    assert [type(unit).__name__ for unit in rebuilt] == names[::-1] == ["AffineCoupling", "ActNormConv1x1"] * 4
    for i, unit in enumerate(rebuilt):
        for p in unit.parameters():  # accumulated right after its unit, before the next is rebuilt
            assert rebuilt_when_accumulated[p] == i + 1, (i, names[-1 - i])
    assert len(rebuilt_when_accumulated) == len(list(chain.parameters()))


def test_ill_conditioned_inverse_warns_with_the_measured_error():
    torch.manual_seed(6)
    layer = flowkern.nn.AffineCoupling(4, 8)
    with torch.no_grad():  # y = x·e^-30 + 1: x is lost to rounding, and the inverse cannot bring it back
        layer.conditioner[-1].bias.copy_(torch.tensor([-32.0] * 2 + [1.0] * 2))
    chain = flowkern.nn.FlowSequential(layer, flowkern.nn.AffineCoupling(4, 8, parity=1), memory_saving=True,
                                       check_reconstruction=1e-3)
    x = torch.randn(2, 4, 3, 3)
    y, logdet = chain(x)
    with pytest.warns(ReconstructionWarning, match=r"relative error \S+ \(tolerance 0.001\)"):
        (y.sum() + logdet.sum()).backward()
    assert not chain.last_reconstruction_error <= 1e-3


def test_a_second_derivative_is_refused():
    chain = flowkern.nn.FlowSequential(flowkern.nn.AffineCoupling(4, 8), memory_saving=True)
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    y, logdet = chain(x)
    (grad,) = torch.autograd.grad(y.square().sum() + logdet.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grad.sum().backward()


def test_no_graph_no_inversion_and_compile_runs_the_chains_eagerly():
    model = flowkern.Glow(3, 8, levels=2, steps=2, hidden_channels=8, memory_saving=True)
    x = torch.rand(2, 3, 8, 8) - 0.5
    with torch.no_grad():
        zs, logdet = model(x)  # plain forward: nothing to rebuild
    assert logdet.grad_fn is None
    assert model.sample(2).shape == (2, 3, 8, 8)
    torch._dynamo.reset()
    whole = torch.compile(lambda v: model.log_prob(v).mean(), backend="eager", fullgraph=True)
    with pytest.raises(Exception, match="memory_saving=True rebuilds activations in a hand-written backward"):
        whole(x)
    # without fullgraph: each chain by inversion between compiled graphs, with the gradients of eager
    loss = model.log_prob(x).mean()
    expected = torch.autograd.grad(loss, list(model.parameters()))
    compiled = torch.compile(lambda v: model.log_prob(v).mean(), backend="eager")
    loss_compiled = compiled(x)
    got = torch.autograd.grad(loss_compiled, list(model.parameters()))
    torch.testing.assert_close(loss_compiled, loss)
    torch.testing.assert_close(got, expected)


def test_a_folding_flow_step_is_rebuilt_as_two_units():
    step = flowkern.nn.FlowStep(4, hidden_channels=8)
    x = torch.randn(6, 4, 5, 5)
    assert [type(u).__name__ for u in step.units()] == ["ActNorm", "InvConv1x1", "AffineCoupling"]
    step(x)  # ActNorm's initialisation
    assert [type(u).__name__ for u in step.units()] == ["ActNormConv1x1", "AffineCoupling"]
    assert all(isinstance(u, flowkern.nn.Unit) for u in step.units())
    mixing = next(step.units())
    assert mixing is step.actnorm_conv1x1 and "actnorm_conv1x1" not in dict(step.named_modules())  # not a submodule
    assert list(step.state_dict()) == list(flowkern.nn.FlowStep(4, hidden_channels=8).state_dict())
    assert {id(p) for p in mixing.parameters()} == {id(p) for p in [*step.actnorm.parameters(),
                                                                   *step.invconv.parameters()]}
    y, logdet = mixing(x)
    u, actnorm_logdet = step.actnorm(x)
    y_unfolded, conv_logdet = step.invconv(u)
    torch.testing.assert_close(y, y_unfolded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logdet, actnorm_logdet + conv_logdet)
    torch.testing.assert_close(mixing.inverse(y), x, rtol=1e-4, atol=1e-4)
    step.fold_actnorm = False
    assert len(list(step.units())) == 3


def test_the_backward_rebuilds_with_the_backend_of_the_forward_in_any_thread(monkeypatch):
    """A ``use_backend`` block is local to its thread; autograd may run a backward in another one."""
    import threading

    calls = []

    def counted(op, fn):
        def op_fn(*args):
            calls.append(threading.current_thread().name)
            return fn(*args)
        return op_fn
    fake_backend(monkeypatch, "counted", counted)
    model = flowkern.Glow(3, 8, levels=2, steps=2, hidden_channels=8, memory_saving=True)
    x = torch.rand(2, 3, 8, 8) - 0.5
    model(x)
    with flowkern.use_backend("counted"):
        loss = -model.log_prob(x).mean()
    forward_calls = len(calls)
    thread = threading.Thread(target=loss.backward, name="elsewhere")
    thread.start()
    thread.join()
    assert forward_calls > 0 and "elsewhere" in calls[forward_calls:]
    assert all(p.grad is not None for p in model.parameters())
