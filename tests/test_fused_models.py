"""Whole models on every fused backend: forward, inverse and backward equal the reference backend's;
the fused ops trace into one graph under torch.compile."""
import os

import pytest
import torch

import flowkern
from flowkern import backends
from helpers import flatten_output, initialize, randomize_
from fused_backends import FUSED_BACKENDS, load_backend, whole_model_backends

MODELS = [
    ("glow", lambda: flowkern.Glow(3, 8, levels=2, steps=2, hidden_channels=16), (4, 3, 8, 8)),
    ("glow-additive", lambda: flowkern.Glow(2, 8, levels=2, steps=2, hidden_channels=8, coupling="additive",
                                            lu=False), (4, 2, 8, 8)),
    ("realnvp", lambda: flowkern.RealNVP(3, 8, scales=2, hidden_channels=8, blocks=1), (4, 3, 8, 8)),
    ("realnvp2d", lambda: flowkern.RealNVP2d(dim=3, hidden=16, layers=4), (16, 3)),
]


def assert_relative_error(got, expected, bound, what):
    """‖got − expected‖ ≤ bound · ‖expected‖: a gradient summed over many terms is accurate relative to its
    scale, not elementwise (a near-zero entry is the difference of large float32 sums)."""
    error = (got - expected).norm() / expected.norm().clamp_min(1e-30)
    assert error <= bound, f"{what}: relative error {error:.2e} > {bound:.0e}"


def _run(model, x):
    """Latents, log-likelihood, reconstruction and parameter gradients of one training step."""
    model.zero_grad()
    latents, _ = model(x)
    log_prob = model.log_prob(x)
    (-log_prob.mean()).backward()
    with torch.no_grad():
        reconstruction = model.inverse(latents)
    grads = [p.grad.clone() for p in model.parameters()]
    return flatten_output(latents).detach(), log_prob.detach(), reconstruction, grads


@pytest.mark.parametrize("name", whole_model_backends(FUSED_BACKENDS))
@pytest.mark.parametrize("model_name,factory,shape", MODELS, ids=[m[0] for m in MODELS])
def test_model_matches_reference_backend(name, model_name, factory, shape, monkeypatch):
    load_backend(name, monkeypatch)
    x = torch.rand(*shape) - 0.5
    model = factory()
    with flowkern.use_backend("reference"):
        if model_name != "realnvp2d":
            initialize(model, x)
        randomize_(model, 0.05).train()
        expected = _run(model, x)
    with flowkern.use_backend(name):
        got = _run(model, x)
    latents, log_prob, reconstruction, grads = got
    torch.testing.assert_close(latents, expected[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(log_prob, expected[1], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(flatten_output(reconstruction), flatten_output(x), rtol=1e-4, atol=1e-5)
    assert len(grads) == len(expected[3])
    for i, (g, e) in enumerate(zip(grads, expected[3])):
        assert_relative_error(g, e, 1e-4, f"gradient of parameter {i}")


@pytest.mark.parametrize("name", whole_model_backends(FUSED_BACKENDS))
def test_glow_compiles_into_one_graph(name, monkeypatch):
    import torch._dynamo as dynamo

    load_backend(name, monkeypatch)
    x = torch.rand(4, 3, 8, 8) - 0.5
    model = initialize(flowkern.Glow(3, 8, levels=2, steps=2, hidden_channels=8), x)
    randomize_(model, 0.02).train()
    with flowkern.use_backend(name):
        explanation = dynamo.explain(model.log_prob)(x)
        assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
        assert explanation.graph_count == 1
        ops = {str(node.target) for g in explanation.graphs for node in g.graph.nodes}
        prefix = backends._load(name).PREFIX
        assert f"flowkern.{prefix}coupling_forward.default" in ops, "the fused ops are in the graph"

        dynamo.reset()
        loss_fn = torch.compile(lambda v: -model.log_prob(v).mean(), fullgraph=True)
        loss = loss_fn(x)
        loss.backward()
        compiled_grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        eager = -model.log_prob(x).mean()
        eager.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-5)
    for i, (g, e) in enumerate(zip(compiled_grads, (p.grad for p in model.parameters()))):
        assert_relative_error(g, e, 1e-4, f"gradient of parameter {i}")


def test_required_backends_are_available():
    """``make test`` names the backends that must load (``FLOWKERN_REQUIRE_BACKENDS``), so none is skipped."""
    required = [n for n in os.environ.get("FLOWKERN_REQUIRE_BACKENDS", "").split(",") if n]
    status = flowkern.available_backends(with_reasons=True)
    for name in required:
        assert status.get(name, "unknown backend") is None, f"backend {name!r} must be available: {status.get(name)}"


def test_compiling_log_prob_and_inverse_as_the_readme_says():
    """``torch.compile(model)`` compiles ``forward``; ``log_prob`` and ``inverse`` are compiled as methods."""
    x = torch.rand(4, 3, 8, 8) - 0.5
    model = initialize(flowkern.Glow(3, 8, levels=2, steps=2, hidden_channels=8), x)
    randomize_(model, 0.02).eval()
    torch._dynamo.reset()
    log_prob = torch.compile(model.log_prob, backend="aot_eager", fullgraph=True)
    inverse = torch.compile(model.inverse, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(log_prob(x), model.log_prob(x))
        zs = [0.7 * torch.randn(4, *shape) for shape in model.latent_shapes()]
        torch.testing.assert_close(inverse(zs), model.inverse(zs))
