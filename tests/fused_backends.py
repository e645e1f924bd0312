"""What the fused-backend tests share: the backends and their device, the backend fixture, inputs in several
layouts, tolerances."""
import pytest
import torch

import flowkern
from flowkern import backends

FUSED_BACKENDS = [name for name in backends.MODULES if name != "reference"]
# Fused backends are tested on the GPU where there is one, on the CPU (Triton's interpreter) otherwise.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LAYOUTS = ("contiguous", "channel-slice", "channels-last")


def whole_model_backends(names):
    """``names`` as pytest parameters for tests of whole models, Triton's marked ``slow`` where it runs in its
    interpreter (a whole model there takes seconds)."""
    return [pytest.param(n, marks=pytest.mark.slow) if n == "triton" and DEVICE == "cpu" else n for n in names]

# float32 ~1e-5 relative; float16 one rounding of the float32 result; float64 near machine precision.
TOLERANCE = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}
# A log-det sums up to thousands of terms per sample, in an order that differs between kernels.
LOGDET_TOLERANCE = {
    torch.float32: dict(rtol=1e-5, atol=1e-4),
    torch.float64: dict(rtol=1e-10, atol=1e-10),
}


def load_backend(name, monkeypatch):
    """The backend module, with kernel outputs poisoned where the backend allows; skip if unavailable.

    New tensors are created on ``DEVICE`` until the test ends."""
    reason = flowkern.available_backends(with_reasons=True)[name]
    if reason is not None:
        pytest.skip(f"backend {name!r} unavailable: {reason}")
    if name == "triton":
        monkeypatch.setattr("flowkern.backends.triton._common.POISON_OUTPUTS", True)
    torch.set_default_device(DEVICE)
    return backends._load(name)


def make(shape, dtype=torch.float32, layout="contiguous", scale=1.0):
    """A fresh random tensor of ``shape`` (N, C, H, W) stored in the given layout."""
    n, c, h, w = shape

    def fresh(*size):
        return (scale * torch.randn(*size, dtype=torch.float64)).to(dtype)

    if layout == "contiguous":
        return fresh(n, c, h, w)
    if layout == "channel-slice":  # what chunk/narrow along channels returns: dense planes, strided samples
        return fresh(n, c + 3, h, w)[:, 2:c + 2]
    if layout == "channels-last":  # planes not dense: the kernels must copy or stride correctly
        return fresh(n, h, w, c).permute(0, 3, 1, 2)
    raise ValueError(layout)


def value_and_grads(fn, inputs, upstream):
    """Outputs of ``fn(*inputs)`` and the gradients of Σ output·upstream w.r.t. every input."""
    leaves = [t.detach().requires_grad_() if t is not None else None for t in inputs]
    outputs = fn(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    loss = sum((o.float() * u).sum() for o, u in zip(outputs, upstream))
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None])
    return [o.detach() for o in outputs], list(grads)


def assert_close(got, expected, dtype, what):
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g.shape == e.shape, f"{what}[{i}]: shape {tuple(g.shape)} != {tuple(e.shape)}"
        torch.testing.assert_close(g.to(e.dtype), e, **TOLERANCE[dtype], msg=lambda m: f"{what}[{i}]: {m}")
