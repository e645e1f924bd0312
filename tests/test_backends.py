"""Backend selection: names, the context manager, and a backend that fails to load."""
import pytest
import torch

import flowkern
from flowkern import backends


def test_default_and_available():
    assert flowkern.get_backend() == "auto"
    assert {"reference", "auto"} <= set(flowkern.available_backends())
    assert flowkern.available_backends(with_reasons=True)["reference"] is None
    status = flowkern.available_backends(with_reasons=True)
    first = next(name for name in backends.AUTO_PREFERENCE["cpu"] if status[name] is None)
    assert backends.resolve(torch.device("cpu")) is backends._load(first)


def test_set_and_use_backend_restore_the_previous_one():
    flowkern.set_backend("reference")
    assert flowkern.get_backend() == "reference"
    with pytest.raises(RuntimeError, match="inside"):
        with flowkern.use_backend("auto"):
            assert flowkern.get_backend() == "auto"
            raise RuntimeError("inside")
    assert flowkern.get_backend() == "reference"


def test_unknown_backend_name():
    with pytest.raises(ValueError, match=r"unknown backend 'cuda-magic'; expected one of: reference.*auto"):
        flowkern.set_backend("cuda-magic")
    with pytest.raises(TypeError, match="must be a str"):
        flowkern.set_backend(3)
    with pytest.raises(ValueError, match="unknown backend"):
        with flowkern.use_backend("nope"):
            pass
    assert flowkern.get_backend() == "auto"


def test_backend_that_fails_to_load_is_reported_and_skipped(monkeypatch):
    monkeypatch.setitem(backends._MODULES, "broken", "flowkern._no_such_module")
    monkeypatch.setattr(backends, "AUTO_PREFERENCE", {"cpu": ("broken", "reference")})
    monkeypatch.setattr(backends, "_reasons", {})
    monkeypatch.setattr(backends, "_auto", {})
    with pytest.raises(backends.BackendUnavailable, match="backend 'broken' is unavailable: .*_no_such_module"):
        flowkern.set_backend("broken")
    status = flowkern.available_backends(with_reasons=True)
    assert "ModuleNotFoundError" in status["broken"]
    assert "broken" not in flowkern.available_backends()
    assert backends.resolve(torch.device("cpu")) is flowkern.reference
    layer = flowkern.nn.ActNorm(2)
    assert layer(torch.randn(2, 2, 2, 2))[0].shape == (2, 2, 2, 2)


def test_backend_missing_an_op_is_unavailable(monkeypatch):
    monkeypatch.setitem(backends._MODULES, "partial", "flowkern.reference.squeeze")
    monkeypatch.setattr(backends, "_reasons", {})
    with pytest.raises(backends.BackendUnavailable, match="does not define coupling_forward"):
        flowkern.set_backend("partial")


@pytest.mark.parametrize("name", ["reference", "auto"])
def test_every_backend_matches_reference_on_a_flow_step(name):
    step = flowkern.nn.FlowStep(6, 8)
    x = torch.randn(3, 6, 5, 3)
    step(x)
    with torch.no_grad():
        for p in step.parameters():
            p.add_(0.02 * torch.randn_like(p))
    with flowkern.use_backend("reference"):
        expected = step(x)
    with flowkern.use_backend(name):
        got = step(x)
    torch.testing.assert_close(got, expected)
