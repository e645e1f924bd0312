"""What the conformance tests against the peer libraries share: the peer import, perturbed parameters, the
comparison of two modules' maps and gradients, and tolerances (the ``each_backend`` fixture is in conftest.py)."""
import copy
import os

import pytest
import torch

import flowkern
from flowkern.dropin import acceleration_report


def peer(name):
    """The installed peer library; ``make test`` requires it (``FLOWKERN_REQUIRE_PEERS``), elsewhere a missing
    one skips."""
    if name in os.environ.get("FLOWKERN_REQUIRE_PEERS", "").split(","):
        return __import__(name)
    return pytest.importorskip(name)


F64 = dict(rtol=1e-10, atol=1e-10)
GRAD64 = dict(rtol=1e-8, atol=1e-10)
F32 = dict(rtol=1e-5, atol=1e-5)
F32_MODEL = dict(rtol=1e-4, atol=1e-5)  # latents after many layers, as tests/test_fused_models.py compares them
# A parameter's gradient sums thousands of products over the batch and the pixels, whose float32 roundings
# differ between the fused and the peer's order: compared by the norm of the difference per tensor.
F32_GRAD = dict(norm=1e-5)


def perturb(module, scale=0.1):
    """Every parameter moved off its initial value (zero-initialised last layers make couplings the identity)."""
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:  # FrEIA keeps its permutations as parameters without gradients
                p.add_(scale * torch.randn_like(p))
    return module


def accelerated_copy(module):
    """(original, accelerated deep copy)."""
    return module, flowkern.accelerate(copy.deepcopy(module))


def flat(out):
    """The tensors of a layer's output, in order (nested tuples and lists flattened, scalars as tensors)."""
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in flat(o)]
    return [torch.as_tensor(out)]


def assert_same_map(original, accelerated, call, inputs, tol=F64, grad_tol=GRAD64):
    """``call(module, *inputs)`` by both: each output (shape and dtype included) and the gradients of every
    parameter and input from one random projection of the outputs."""
    results = []
    for module in (original, accelerated):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        outs = flat(call(module, *leaves))
        params = [p for p in module.parameters() if p.requires_grad]
        torch.manual_seed(1)
        loss = sum((o * torch.randn(o.shape, dtype=o.dtype)).sum() for o in outs if o.requires_grad)
        grads = torch.autograd.grad(loss, params + leaves, allow_unused=True)
        results.append((outs, [torch.zeros_like(t) if g is None else g for g, t in zip(grads, params + leaves)]))
    (outs_o, grads_o), (outs_a, grads_a) = results
    assert [(o.shape, o.dtype) for o in outs_a] == [(o.shape, o.dtype) for o in outs_o]
    for got, want in zip(outs_a, outs_o):
        torch.testing.assert_close(got, want, **tol)
    for got, want in zip(grads_a, grads_o):
        if "norm" in grad_tol:
            assert (got - want).norm() <= grad_tol["norm"] * want.norm(), ((got - want).norm() / want.norm()).item()
        else:
            torch.testing.assert_close(got, want, **grad_tol)


def assert_accelerated(model, count):
    report = acceleration_report(model)
    print(report)
    assert sum(e.accelerated for e in report) == count, str(report)


def directions(module):
    return [lambda m, z: m(z), lambda m, z: m.inverse(z)]
