"""What makes a whole Glow step fast keeps it exact: ActNorm folded into the conditioners' convolutions,
the cached LU weights, old checkpoints, and the plain-PyTorch Glow the benchmarks compare with."""
import os

import pytest
import torch

import flowkern
from benchmarks.plain_glow import PlainGlow
from flowkern.nn import conditioners
from flowkern.nn.conditioners import ConvActNorm, GlowConditioner, glow_conditioner_by_matmul
from helpers import initialize, randomize_
from fused_backends import FUSED_BACKENDS, load_backend, whole_model_backends

CHECKPOINT = os.path.join(os.path.dirname(__file__), "data", "glow_checkpoint.pt")


def set_folding(model, fold):
    """Fold ActNorm into the conditioners' convolutions (and into the 1×1 convs of the flow steps), or not."""
    for module in model.modules():
        if isinstance(module, (ConvActNorm, flowkern.nn.FlowStep)):
            module.fold_actnorm = fold


def log_prob_and_grads(model, x):
    model.zero_grad()
    log_prob = model.log_prob(x)
    log_prob.sum().backward()
    return log_prob.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("backend", whole_model_backends(["reference", *FUSED_BACKENDS]))
def test_folded_conditioners_equal_unfolded_ones(backend, monkeypatch):
    if backend != "reference":
        load_backend(backend, monkeypatch)
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64) - 0.5
    model = flowkern.Glow(3, 8, levels=2, steps=2, hidden_channels=8).double()
    with flowkern.use_backend(backend):
        randomize_(initialize(model, x), 0.05).train()
        latents = {}
        for fold in (True, False):
            set_folding(model, fold)
            latents[fold] = torch.cat([z.flatten(1) for z in model(x)[0]], 1).detach()
            log_prob, grads = log_prob_and_grads(model, x)
            if fold:
                folded = log_prob, grads
    torch.testing.assert_close(latents[True], latents[False], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(folded[0], log_prob, rtol=1e-10, atol=1e-10)
    assert len(grads) == len(folded[1])
    for got, expected in zip(folded[1], grads):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", [(3, 5, 7, 6), (2, 1, 1, 1), (1, 4, 2, 9)])
def test_the_conditioner_as_matrix_products_equals_its_convolutions(shape):
    n, c, height, width = shape
    x = torch.randn(n, c + 2, height, width, dtype=torch.float64)[:, 1:c + 1]  # a channel slice, as chunk gives
    conditioner = randomize_(GlowConditioner(c, 6, hidden_channels=10).double(), 0.1)
    first, hidden, last = conditioner
    weights = [*first.folded(), *hidden.folded(), last.weight, last.bias]

    def by_convolutions(x, *weights):
        w1, b1, w2, b2, w3, b3 = weights
        h = torch.nn.functional.conv2d(x, w1, b1, padding=1).relu()
        h = torch.nn.functional.conv2d(h, w2, b2).relu()
        return torch.nn.functional.conv2d(h, w3, b3, padding=1)
    inputs = [x, *(w.detach() for w in weights)]
    torch.autograd.gradcheck(glow_conditioner_by_matmul, [t.clone().requires_grad_() for t in inputs])
    upstream = torch.randn(n, 6, height, width, dtype=torch.float64)
    results = []
    for fn in (glow_conditioner_by_matmul, by_convolutions):
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = fn(*leaves)
        results.append([out, *torch.autograd.grad(out, leaves, upstream)])
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_the_conditioner_takes_matrix_products_on_the_cpu_once_folded_and_wide(monkeypatch):
    calls = []
    monkeypatch.setitem(flowkern.nn.conditioners.FORM_FUNCTIONS, "matrix products",
                        lambda *args: calls.append(args) or glow_conditioner_by_matmul(*args))
    wide, narrow = GlowConditioner(3, 6, hidden_channels=54), GlowConditioner(3, 6, hidden_channels=53)
    wide.form = narrow.form = "matrix products"
    x = torch.randn(4, 3, 5, 5)
    unfolded = wide(x)  # initialises ActNorm: convolutions, unfolded
    narrow(x)
    assert not calls
    torch.testing.assert_close(wide(x), unfolded, rtol=1e-5, atol=1e-6)
    assert len(calls) == 1
    narrow(x)  # its per-tap products (9·6 channels) would be larger than its hidden activations (53)
    wide.form = "convolutions"
    wide(x)
    wide.form = "matrix products"
    monkeypatch.setattr(GlowConditioner, "MATMUL_DEVICES", ())
    wide(x)
    assert len(calls) == 1
    wide.form = "by hand"
    monkeypatch.undo()
    with pytest.raises(ValueError, match="form"):
        wide(x)


@pytest.mark.parametrize("form", GlowConditioner.FORMS)
def test_each_conditioner_form_is_the_same_map(form):
    """Each form against the modules' own convolutions, values and gradients, on a folded conditioner."""
    conditioner = randomize_(GlowConditioner(3, 6, hidden_channels=60), 0.1).double()
    x = torch.randn(2, 3, 7, 5, dtype=torch.float64)
    conditioner(x)  # ActNorm's initialisation
    results = []
    for chosen in ("convolutions", form):
        conditioner.form = chosen
        assert conditioner.form_of(x) == chosen
        leaf = x.clone().requires_grad_()
        out = conditioner(leaf)
        results.append([out, *torch.autograd.grad(out, [leaf, *conditioner.parameters()], torch.ones_like(out))])
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("grad", [True, False])
def test_the_conditioner_measures_its_faster_form_once_per_shape(grad, monkeypatch):
    """With ``form`` unset, the first call of a shape times both forms (forward, and backward where a gradient
    is recorded) on copies, keeps the faster, and leaves the parameters' gradients untouched."""
    from flowkern.nn import conditioners

    monkeypatch.setattr(conditioners, "FORM_CHOICES", {})
    conditioner = randomize_(GlowConditioner(3, 6, hidden_channels=60), 0.1)
    x = torch.randn(2, 3, 7, 7)
    conditioner(x)  # ActNorm's initialisation
    chosen = []
    monkeypatch.setattr(conditioners, "fastest", lambda calls, rounds: chosen.append(list(calls)) or (
        "matrix products", dict.fromkeys(calls, 1.0)))
    with torch.set_grad_enabled(grad):
        out = conditioner(x)
        assert conditioner(x).equal(out)  # measured once: the second call takes the choice
    assert chosen == [list(GlowConditioner.FORMS)]
    (key, (form, seconds)), = conditioners.FORM_CHOICES.items()
    assert key[-1] is grad and form == "matrix products" and set(seconds) == set(GlowConditioner.FORMS)
    assert all(p.grad is None for p in conditioner.parameters())
    first, hidden, last = conditioner
    expected = conditioners.glow_conditioner_by_convolutions(x, *first.folded(), *hidden.folded(), last.weight,
                                                             last.bias)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    conditioners.FORM_CHOICES[key] = ("convolutions", seconds)
    with torch.set_grad_enabled(grad):
        assert conditioner.form_of(x) == "convolutions"


def test_compiled_conditioners_keep_their_convolutions():
    import torch._dynamo as dynamo

    x = torch.rand(4, 3, 8, 8) - 0.5
    model = initialize(flowkern.Glow(3, 8, levels=2, steps=1, hidden_channels=128), x).train()
    conditioners = [m for m in model.modules() if isinstance(m, GlowConditioner)]
    for conditioner in conditioners:
        conditioner.form = "matrix products"
    condition = torch.randn(4, 6, 4, 4)  # the first level's conditioner input
    assert conditioners[0].form_of(condition) == "matrix products"  # eagerly
    explanation = dynamo.explain(model.log_prob)(x)
    targets = {node.target for graph in explanation.graphs for node in graph.graph.nodes}
    assert torch.nn.functional.fold not in targets and torch.conv2d in targets


def test_conditioner_actnorm_initialises_unfolded_on_the_first_training_batch():
    layer = ConvActNorm(3, 5, 3)
    x = torch.randn(8, 3, 6, 6) * 3 + 1
    h = layer(x)  # initialises: the pre-ReLU output is standardised per channel
    pre = layer.norm(layer.conv(x))[0]
    torch.testing.assert_close(pre.mean((0, 2, 3)), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(pre.std((0, 2, 3), unbiased=False), torch.ones(5), atol=1e-4, rtol=0)
    torch.testing.assert_close(h, pre.relu())
    assert bool(layer.norm.initialized)
    torch.testing.assert_close(layer(x), h)  # folded from now on, the same map


def test_a_checkpoint_of_the_unfolded_glow_loads_and_gives_its_log_prob():
    saved = torch.load(CHECKPOINT)
    model = flowkern.Glow(**saved["config"])
    model.load_state_dict(saved["model"])  # strict: the parameter and buffer names are unchanged
    with torch.no_grad():
        log_prob = model.double().eval().log_prob(saved["x"])
    torch.testing.assert_close(log_prob, saved["log_prob"], rtol=1e-12, atol=1e-10)
    model.train()  # initialised: training mode folds too, without initialising again
    with torch.no_grad():
        torch.testing.assert_close(model.log_prob(saved["x"]), saved["log_prob"], rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("fused", [False, True])  # fused Adam leaves the parameters' version counters alone
def test_the_cached_weights_follow_the_parameters(fused):
    conv = flowkern.nn.InvConv1x1(6).eval()
    with torch.no_grad():
        weight, inverse = conv.weight_matrix(), conv.inverse_weight_matrix()
        assert conv.weight_matrix() is weight and conv.inverse_weight_matrix() is inverse  # cached
        conv.train()
        assert conv.inverse_weight_matrix() is not inverse  # not in training, where the factors change
        conv.eval()
    torch.testing.assert_close(weight @ inverse, torch.eye(6), atol=1e-5, rtol=0)
    optimizer = torch.optim.Adam(conv.parameters(), lr=1e-3, fused=fused)
    x = torch.randn(2, 6, 3, 3)
    y, logdet = conv(x)
    assert y.requires_grad  # with gradients enabled the weight is built under autograd, not taken from the cache
    ((y ** 2).sum() - logdet.sum()).backward()
    optimizer.step()
    with torch.no_grad():
        new_weight, new_inverse = conv.weight_matrix(), conv.inverse_weight_matrix()
        assert not torch.allclose(new_inverse, inverse)
        torch.testing.assert_close(new_weight @ new_inverse, torch.eye(6), atol=1e-5, rtol=0)
        expected = flowkern.reference.lu_weight_inverse(conv.perm, conv.lower, conv.upper, conv.sign, conv.log_s)
        torch.testing.assert_close(new_inverse, expected)
        conv.load_state_dict(flowkern.nn.InvConv1x1(6).state_dict())  # copied in place: cached no longer
        assert not torch.allclose(conv.inverse_weight_matrix(), new_inverse)


def test_sampling_uses_the_current_weights_after_an_optimiser_step():
    x = torch.rand(4, 3, 8, 8) - 0.5
    model = randomize_(initialize(flowkern.Glow(3, 8, levels=2, steps=2, hidden_channels=8), x), 0.05)
    latents = [z.detach() for z in model(x)[0]]
    torch.testing.assert_close(model.inverse(latents), x, atol=1e-4, rtol=0)  # fills the caches
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.bits_per_dim(x).mean().backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        latents = [z.detach() for z in model(x)[0]]
        torch.testing.assert_close(model.inverse(latents), x, atol=1e-4, rtol=0)


def test_the_plain_pytorch_glow_has_flowkerns_density_given_the_same_parameters():
    x = torch.rand(4, 3, 16, 16, dtype=torch.float64) - 0.5
    model = randomize_(initialize(flowkern.Glow(3, 16, levels=3, steps=2, hidden_channels=8).double(), x), 0.05)
    plain = PlainGlow(3, 16, levels=3, steps=2, hidden_channels=8).double()
    plain.load_state_dict(model.state_dict())
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(plain.log_prob(x), model.log_prob(x), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(plain.bits_per_dim(x), model.bits_per_dim(x), rtol=1e-12, atol=1e-12)
    plain.log_prob(x).sum().backward()
    model.log_prob(x).sum().backward()
    params = dict(model.named_parameters())
    for name, p in plain.named_parameters():
        torch.testing.assert_close(p.grad, params[name].grad, rtol=1e-9, atol=1e-9, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(plain.reverse(plain(x)[1]), x, rtol=1e-9, atol=1e-9)  # what sampling runs
    samples = PlainGlow(3, 16, levels=3, steps=2, hidden_channels=8).sample(5, temperature=0.7)
    assert samples.shape == (5, 3, 16, 16) and torch.isfinite(samples).all()


def coupling_value_and_grads(layer, x, upstream, backend):
    """``(y, logdet, ∂x, ∂ every parameter)`` of ``layer`` from ``upstream`` gradients, under ``backend``."""
    layer.zero_grad()
    leaf = x.detach().clone().requires_grad_()
    with flowkern.use_backend(backend):
        y, logdet = layer(leaf)
        outputs = [(o, g) for o, g in zip((y, logdet), upstream) if o.requires_grad]  # additive: a constant log-det
        torch.autograd.backward(*zip(*outputs))
    return [y.detach(), logdet.detach(), leaf.grad, *(p.grad.clone() for p in layer.parameters())]


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("kind,channels,options", [
    ("affine", 6, dict(mask="channel", parity=0)), ("affine", 7, dict(mask="channel", parity=1)),
    ("affine", 4, dict(mask="checkerboard", parity=1, scale="exp", bound=1.5)),
    ("additive", 5, dict(mask="channel", parity=0)),
])
def test_the_coupling_node_equals_the_composition_of_its_modules(backend, kind, channels, options, monkeypatch):
    """GlowCoupling (a fused backend, the conditioner's ActNorms folded) against the same layer's modules composed
    on the reference backend: outputs, log-det and the gradients of x and of every parameter, in float64."""
    from flowkern.nn.glow_coupling import GlowCoupling

    load_backend(backend, monkeypatch)
    cls = flowkern.nn.AffineCoupling if kind == "affine" else flowkern.nn.AdditiveCoupling
    layer = cls(channels, hidden_channels=9, **options).double()
    x = torch.rand(3, channels, 5, 7, dtype=torch.float64) - 0.5
    randomize_(initialize(layer, x), 0.1).train()
    upstream = (torch.randn_like(x), torch.randn(3, dtype=torch.float64))
    nodes = []
    monkeypatch.setattr(GlowCoupling, "forward", _recording(GlowCoupling.forward, nodes))
    got = coupling_value_and_grads(layer, x, upstream, backend)
    assert len(nodes) == 1, "the fused backend runs the layer as one node"
    expected = coupling_value_and_grads(layer, x, upstream, "reference")
    assert len(nodes) == 1, "the reference backend composes the modules"
    assert len(got) == len(expected) == 3 + len(list(layer.parameters()))
    for i, (g, e) in enumerate(zip(got, expected)):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10, msg=lambda m: f"output {i}: {m}")


def _recording(forward, calls):
    def recorded(ctx, *args):
        calls.append(ctx)
        return forward(ctx, *args)
    return staticmethod(recorded)


def test_the_coupling_node_under_autocast_gives_the_modules_gradients():
    """Under CPU bfloat16 autocast the node runs its conditioner in bfloat16 as the modules do, and gives the
    gradients of the composition under the same autocast (up to bfloat16 rounding), in the parameters' dtype."""
    layer = flowkern.nn.AffineCoupling(6, hidden_channels=16)
    x = torch.rand(4, 6, 8, 8) - 0.5
    randomize_(initialize(layer, x), 0.05).train()
    upstream = (torch.randn_like(x), torch.randn(4))
    results = {}
    for backend in ("native", "reference"):
        if backend not in flowkern.available_backends():
            pytest.skip("the native backend is not built")
        with torch.autocast("cpu", torch.bfloat16):
            results[backend] = coupling_value_and_grads(layer, x, upstream, backend)
    for i, (g, e) in enumerate(zip(results["native"], results["reference"])):
        assert g.dtype == e.dtype == torch.float32, i
        torch.testing.assert_close(g, e, rtol=2e-2, atol=2e-2 * e.abs().max().item(), msg=lambda m: f"{i}: {m}")


def test_training_by_inversion_through_the_coupling_node_equals_backprop():
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64) - 0.5
    models = [flowkern.Glow(3, 8, levels=2, steps=2, hidden_channels=8, memory_saving=saving).double()
              for saving in (False, True)]
    randomize_(initialize(models[0], x), 0.05)
    models[1].load_state_dict(models[0].state_dict())
    results = []
    for model in models:
        model.train()
        with flowkern.use_backend("native" if "native" in flowkern.available_backends() else "reference"):
            results.append(log_prob_and_grads(model, x))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-10, atol=1e-10)
    for got, expected in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


# Kernel-launching ops of a Glow (L=2, K=3, 32 hidden, batch 4: 6 flow steps) counted on the CPU on the native
# backend. The bounds are today's counts, so that no change adds launches unseen; the benchmark suite reports
# them per flow step beside each provider's times.
OPS = {"train": 225, "by inversion": 309, "sample": 66}


@pytest.mark.parametrize("mode", OPS)
def test_ops_per_flow_step_and_host_syncs(mode):
    from benchmarks.measure import count_dispatches

    if "native" not in flowkern.available_backends():
        pytest.skip("the native backend is not built")
    x = torch.rand(4, 3, 16, 16) - 0.5
    model = flowkern.Glow(3, 16, levels=2, steps=3, hidden_channels=32, memory_saving=mode == "by inversion")
    for conditioner in model.modules():
        if isinstance(conditioner, GlowConditioner):
            conditioner.form = "convolutions"  # the count, not which form this CPU measured faster
    with torch.no_grad():
        model(x)  # ActNorm's initialisation
    if mode == "sample":
        model.eval()
        run = lambda: model.sample(4)  # noqa: E731
    else:
        def run():
            model.zero_grad(set_to_none=True)
            model.bits_per_dim(x).mean().backward()
    with flowkern.use_backend("native"):
        run()  # in evaluation, W⁻¹ is cached on the first call
        counts = count_dispatches(run)
    assert counts["ops"] <= OPS[mode], counts["by_op"]
    # nothing is read back: the flow steps' inverse weights come from their factors in one op, uncached
    assert counts["host_syncs"] == 0


def test_measuring_on_the_first_call_leaves_the_random_stream_alone(monkeypatch):
    """The first sampling call measures the conditioners' form and the ``auto`` backend's choices on random
    inputs of their own: sampling with a seed gives the same images on the first call as on the next."""
    monkeypatch.setattr(conditioners, "FORM_CHOICES", {})
    monkeypatch.setattr(flowkern.backends.auto, "_choices", {})
    model = flowkern.Glow(3, 16, levels=2, steps=1, hidden_channels=128).eval()
    torch.manual_seed(5)
    first = model.sample(2)
    assert conditioners.FORM_CHOICES and flowkern.backends.auto_choices(), "the first call measured"
    torch.manual_seed(5)
    assert torch.equal(model.sample(2), first)
