"""Shared test helpers."""
import torch


def randomize_(module, std=0.1):
    """Perturb every parameter so that no layer is the identity (couplings start as identities)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * std)
    return module


def initialize(module, x):
    """Run one training forward (ActNorm's data-dependent initialisation), then switch to eval mode."""
    module.train()
    with torch.no_grad():
        module(x)
    return module.eval()


def flatten_output(y):
    """One flat vector per sample from a tensor or a (nested) tuple/list of tensors: (N, D)."""
    if isinstance(y, torch.Tensor):
        return y.reshape(y.shape[0], -1)
    return torch.cat([flatten_output(t) for t in y], dim=1)


def bruteforce_logdet(fn, x):
    """log|det ∂fn(x_i)/∂x_i| for each sample, from the full Jacobian: (N,)."""
    values = []
    for i in range(x.shape[0]):
        jac = torch.autograd.functional.jacobian(lambda v: flatten_output(fn(v))[0], x[i:i + 1])
        jac = jac.reshape(jac.shape[0], -1)
        assert jac.shape[0] == jac.shape[1], "a flow layer must preserve the dimension"
        values.append(torch.linalg.slogdet(jac)[1])
    return torch.stack(values)


def max_abs(a, b):
    return (flatten_output(a) - flatten_output(b)).abs().max().item()


def fake_backend(monkeypatch, name, op_wrapper):
    """Register backend ``name`` for one test: the reference's ops, each wrapped by ``op_wrapper(op_name, fn)``."""
    import sys
    import types

    import flowkern
    from flowkern import backends

    module = types.ModuleType(f"flowkern_test_{name}")
    for op in flowkern.reference.OPS + flowkern.reference.BACKWARD_OPS:
        setattr(module, op, op_wrapper(op, getattr(flowkern.reference, op)))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(backends.MODULES, name, module.__name__)
    monkeypatch.setattr(backends.registry, "_loaded", dict(backends.registry._loaded))  # loaded here, forgotten after the test
    return module
