"""Backend selection: names, the context-local setting, what "auto" measures, and backends that fail to load."""
import threading
import time

import pytest
import torch

import flowkern
from flowkern import backends, functional
from helpers import fake_backend


def test_default_and_available():
    assert flowkern.get_backend() == "auto"
    assert {"reference", "auto"} <= set(flowkern.available_backends())
    assert flowkern.available_backends(with_reasons=True)["reference"] is None


def _slow(seconds):
    def wrap(op, fn):
        def slow_op(*args):
            time.sleep(seconds)
            return fn(*args)
        return slow_op
    return wrap


def test_auto_times_each_candidate_once_and_keeps_the_fastest(monkeypatch):
    calls = []

    def counted(op, fn):
        def op_fn(*args):
            calls.append(op)
            return fn(*args)
        return op_fn
    fake_backend(monkeypatch, "sleepy", _slow(0.05))  # far above the others' time even on a loaded machine
    fake_backend(monkeypatch, "counted", counted)
    monkeypatch.setattr(backends.auto, "AUTO_PREFERENCE", {"cpu": ("sleepy", "counted", "reference")})
    monkeypatch.setattr(backends.auto, "_choices", {})
    x, log_scale, bias = torch.randn(2, 3, 4, 5, requires_grad=True), torch.randn(3), torch.randn(3)

    y, logdet = functional.actnorm_forward(x, log_scale, bias)
    choice = backends.auto_choices()[("cpu", "actnorm_forward")]
    assert choice.backward  # x records a gradient, so forward and backward were timed
    assert choice.seconds["sleepy"] >= 0.05 and choice.backend != "sleepy"
    assert choice.backend == "counted" or choice.seconds["reference"] < backends.auto.AUTO_MARGIN * choice.seconds["counted"]
    torch.testing.assert_close((y, logdet), flowkern.reference.actnorm_forward(x, log_scale, bias))

    ran_it = choice.backend == "counted"
    assert len(calls) == 1 + backends.auto.AUTO_ROUNDS + ran_it  # a warm-up and the timed rounds, then the call
    functional.actnorm_forward(x, log_scale, bias)
    assert len(calls) == 1 + backends.auto.AUTO_ROUNDS + 2 * ran_it  # no second measurement
    with torch.no_grad():
        functional.coupling_forward(torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3))
    assert not backends.auto_choices()[("cpu", "coupling_forward")].backward


def test_auto_skips_a_candidate_that_cannot_run_the_inputs(monkeypatch):
    def failing(op, fn):
        def op_fn(*args):
            raise RuntimeError("no kernel for this shape")
        return op_fn
    fake_backend(monkeypatch, "failing", failing)
    monkeypatch.setattr(backends.auto, "AUTO_PREFERENCE", {"cpu": ("failing", "reference")})
    monkeypatch.setattr(backends.auto, "_choices", {})
    x, weight = torch.randn(2, 3, 4, 4), torch.randn(5, 3)
    torch.testing.assert_close(functional.conv1x1(x, weight), flowkern.reference.conv1x1(x, weight))
    choice = backends.auto_choices()[("cpu", "conv1x1")]
    assert choice.backend == "reference" and "no kernel for this shape" in choice.seconds["failing"]


def test_auto_chooses_only_among_backends_that_run_on_the_device(monkeypatch):
    assert backends.unsupported("reference", "meta") is None
    if "native" in flowkern.available_backends():
        assert backends.unsupported("native", "cpu") is None
        assert "not meta" in backends.unsupported("native", "meta")
    monkeypatch.setattr(backends.auto, "_choices", {})
    y, logdet = functional.actnorm_forward(torch.empty(2, 3, 4, 4, device="meta"), torch.zeros(3, device="meta"),
                                           torch.zeros(3, device="meta"))
    assert y.device.type == "meta" and logdet.shape == (2,)
    assert backends.auto_choices()[("meta", "actnorm_forward")] == backends.AutoChoice("reference", {}, False)


def test_compiled_code_chooses_at_trace_time_without_a_graph_break(monkeypatch):
    monkeypatch.setattr(backends.auto, "_choices", {})
    x, h = torch.randn(2, 4, 5, 3), torch.randn(2, 4, 5, 3)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, h: functional.coupling_forward(x, h), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, h), flowkern.reference.coupling_forward(x, h))
    assert ("cpu", "coupling_forward") in backends.auto_choices()
    with flowkern.use_backend("reference"):  # a different backend is guarded on: recompiled, same result
        torch.testing.assert_close(compiled(x, h), flowkern.reference.coupling_forward(x, h))
    monkeypatch.setattr(backends.auto, "_choices", {})
    torch._dynamo.reset()
    dynamic = torch.compile(lambda x, h, parity: functional.coupling_forward(x, h, "checkerboard", parity),
                            fullgraph=True, backend="eager", dynamic=True)  # sizes and numbers are symbols
    h = torch.randn(2, 8, 5, 3)
    torch.testing.assert_close(dynamic(x, h, 1), flowkern.reference.coupling_forward(x, h, "checkerboard", 1))
    assert ("cpu", "coupling_forward") in backends.auto_choices()


def test_use_backend_is_local_to_each_thread():
    seen, barrier = {}, threading.Barrier(2, timeout=30)

    def run(name):
        with flowkern.use_backend(name):
            barrier.wait()  # both threads are inside their blocks at once
            seen[name] = (flowkern.get_backend(), flowkern.nn.ActNorm(3)(torch.randn(2, 3, 4, 4))[0].shape)
            barrier.wait()
    names = ["reference", "native" if "native" in flowkern.available_backends() else "auto"]
    threads = [threading.Thread(target=run, args=(name,)) for name in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {name: (name, (2, 3, 4, 4)) for name in names}
    assert flowkern.get_backend() == "auto"

    flowkern.set_backend("reference")  # the process-wide default reaches threads without a block of their own
    other = []
    thread = threading.Thread(target=lambda: other.append(flowkern.get_backend()))
    thread.start()
    thread.join()
    assert other == ["reference"]


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
    monkeypatch.setitem(backends.MODULES, "broken", "flowkern._no_such_module")
    monkeypatch.setattr(backends.auto, "AUTO_PREFERENCE", {"cpu": ("broken", "reference")})
    monkeypatch.setattr(backends.registry, "_reasons", {})
    monkeypatch.setattr(backends.auto, "_choices", {})
    with pytest.raises(backends.BackendUnavailable, match="backend 'broken' is unavailable: .*_no_such_module"):
        flowkern.set_backend("broken")
    status = flowkern.available_backends(with_reasons=True)
    assert "ModuleNotFoundError" in status["broken"]
    assert "broken" not in flowkern.available_backends()
    layer = flowkern.nn.ActNorm(2)
    assert layer(torch.randn(2, 2, 2, 2))[0].shape == (2, 2, 2, 2)
    assert backends.auto_choices()[("cpu", "actnorm_forward")].backend == "reference"


def test_backend_missing_an_op_is_unavailable(monkeypatch):
    monkeypatch.setitem(backends.MODULES, "partial", "flowkern.reference.squeeze")
    monkeypatch.setattr(backends.registry, "_reasons", {})
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
