"""The compiled extension: its schemas, its refusals of bad input, and flowkern without it."""
import sys

import pytest
import torch

import flowkern
from flowkern import backends
from flowkern.backends._ops import NAMESPACE, SCHEMAS


@pytest.fixture
def native():
    reason = flowkern.available_backends(with_reasons=True)["native"]
    if reason is not None:
        pytest.skip(f"backend 'native' unavailable: {reason}")
    return backends._load("native")


def test_cpp_schemas_are_the_shared_ones(native):
    for name, schema in SCHEMAS.items():
        expected = torch._C.parse_schema(f"{NAMESPACE}::{name}{schema}")
        assert getattr(native.ops, name)._schema == expected, name


@pytest.mark.parametrize("call,message", [
    (lambda ops: ops.coupling_forward(torch.randn(2, 4, 3, 3), torch.randn(2, 3, 3, 3), "channel", 0, "sigmoid", 2.0,
                                      "halves"),
     r"expected h of shape \(2, 4, 3, 3\) for a channel-mask sigmoid coupling"),
    (lambda ops: ops.coupling_forward(torch.randn(2, 4, 3), torch.randn(2, 4, 3), "channel", 0, "sigmoid", 2.0,
                                      "halves"),
     r"expected input of shape \(N, C, H, W\), got 3 dimensions"),
    (lambda ops: ops.coupling_inverse(torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), "stripes", 0, "exp", 2.0,
                                      "halves"),
     r"mask must be 'channel' or 'checkerboard', got 'stripes'"),
    (lambda ops: ops.coupling_forward(torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3).double(), "channel", 0,
                                      "sigmoid", 2.0, "halves"),
     r"expected h of dtype Float, Half or BFloat16 for an input of dtype Float, got Double"),
    (lambda ops: ops.coupling_backward(torch.randn(2, 4, 3, 3).half(), torch.randn(2), torch.randn(2, 4, 3, 3).half(),
                                       torch.randn(2, 4, 3, 3), "channel", 0, "sigmoid", 2.0, "halves", False),
     r"expected h of dtype Half for an input of dtype Half, got Float"),
    (lambda ops: ops.actnorm(torch.randn(2, 4, 3, 3), torch.zeros(3), torch.zeros(4), False),
     r"expected log_scale of shape \(4\)"),
    (lambda ops: ops.conv1x1(torch.randn(2, 4, 3, 3), torch.randn(4, 5), None),
     r"expected weight of shape \(C_out, 4\)"),
    (lambda ops: ops.coupling_forward(torch.randint(0, 3, (2, 4, 3, 3)), torch.randint(0, 3, (2, 4, 3, 3)),
                                      "channel", 0, "sigmoid", 2.0, "halves"),
     r"expected a floating-point input, got Long"),
    (lambda ops: ops.folded_lu_weight(torch.eye(4), *[torch.randn(4, 4)] * 2, *[torch.randn(4)] * 3, torch.randn(5)),
     r"flowkern::folded_lu_weight: expected bias of shape \[4\], got \[5\]"),
    (lambda ops: ops.folded_lu_weight(torch.eye(4).half(), *[torch.randn(4, 4)] * 2, *[torch.randn(4)] * 4),
     r"expected float32 or float64 factors, got Half"),
    (lambda ops: ops.folded_lu_weight(torch.eye(4), torch.randn(4, 4).double(), torch.randn(4, 4),
                                      *[torch.randn(4)] * 4),
     r"expected lower of dtype Float, got Double"),
    (lambda ops: ops.folded_lu_weight_backward(torch.randn(4, 4), torch.randn(4), torch.randn(1), torch.eye(4),
                                               *[torch.randn(4, 4)] * 2, *[torch.randn(4)] * 4, torch.randn(4, 4)),
     r"expected grad_per_pixel of shape \[\], got \[1\]"),
    (lambda ops: ops.fold_actnorms(torch.randn(4, 3, 3, 3), torch.randn(3), torch.randn(4, 4, 1, 1), torch.randn(4)),
     r"flowkern::fold_actnorms: expected log_scale1 of shape \(4\), one scale per output channel of weight1"),
    (lambda ops: ops.fold_actnorms(torch.randn(4, 3, 3, 3), torch.randn(4), torch.randn(4, 4, 1, 1).double(),
                                   torch.randn(4)),
     r"expected weight2 of dtype Float, got Double"),
    (lambda ops: ops.fold_actnorms_backward(torch.randn(4, 3, 3, 3), torch.randn(4, 3, 3, 3), torch.randn(4),
                                            torch.randn(4, 4), torch.randn(4, 4, 1, 1), torch.randn(4)),
     r"expected grad2 of shape \[4, 4, 1, 1\], got \[4, 4\]"),
])
def test_bad_input_raises_a_clear_error(native, call, message):
    with pytest.raises(RuntimeError, match=message):
        call(native.ops)


def test_the_h_dtypes_the_kernels_read_are_those_python_allows(native):
    """The C++ list of h dtypes (reads_h_type in csrc/flowkern/checks.h) and Python's (LOWER_PRECISION) agree."""
    from flowkern.reference._dtypes import LOWER_PRECISION

    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    for x_dtype in dtypes:
        for h_dtype in dtypes:
            x, h = torch.randn(1, 4, 2, 2).to(x_dtype), torch.randn(1, 4, 2, 2).to(h_dtype)
            allowed = h_dtype == x_dtype or h_dtype in LOWER_PRECISION.get(x_dtype, ())
            try:
                native.ops.coupling_forward(x, h, "channel", 0, "sigmoid", 2.0, "halves")
                accepted = True
            except RuntimeError as error:
                assert "expected h of dtype" in str(error)
                accepted = False
            assert accepted == allowed, (x_dtype, h_dtype)


SHAPES = [(1, 1, 1), (3, 5, 7 * 9), (64, 12, 64 * 64), (64, 48, 32 * 32), (2, 384, 16 * 16), (70000, 3, 2)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_cuda_launch_shapes_cover_each_plane_within_cuda_limits(native, dtype):
    """The grids the CUDA launchers take from csrc/flowkern/launch.h, read as the performance model reads them:
    every pixel of every (sample, channel) plane has a block, and grid and shared memory stay within CUDA's
    limits; the weight gradient fills one wave of resident blocks unless the batch has fewer pixel tiles."""
    launch, e = torch.ops.flowkern._cuda_launch, torch.empty(0, dtype=dtype).element_size()
    acc = 8 if dtype == torch.float64 else 4

    def tiles(hw, tile):
        return -(-hw // tile)

    for n, c, hw in SHAPES:
        for kernel in ("coupling", "actnorm"):
            gx, gy, threads, shared, tile, ahead = launch(kernel, n, c, hw, dtype)
            assert (gy, shared, tile) == (1, 0, threads * ahead) and gx == n * c * tiles(hw, tile), kernel
            assert ahead * e >= (16 if kernel == "actnorm" else 4 * e)  # a thread's loads of a plane in flight
        gx, gy, threads, shared, tile, ahead = launch("conv1x1", n, c, hw, dtype)
        assert (gy, tile) == (1, threads) and gx == n * tiles(hw, threads)
        weight = acc * c * tiles(c, 16) * 16  # Wᵀ padded to whole chunks of 16 output channels
        assert shared == (weight if weight <= 48 * 1024 else 0), (c, shared)
        for wave in (1, 132 * 4, 10 ** 6):
            gx, gy, threads, shared, tile, ahead = launch("conv1x1_weight_grad", n, c, hw, dtype, wave)
            pixel_tiles = n * tiles(hw, tile)
            assert gx == tiles(c, 32) ** 2 and 1 <= gy <= min(pixel_tiles, 65535) and shared == 0
            assert gx * gy >= wave or gy == min(pixel_tiles, 65535), (n, c, hw, wave, gx, gy)
            assert threads * ahead == 32 * tile  # a stage of 32 channels × tile pixels, split over the threads


@pytest.mark.parametrize("args,message", [
    (("coupling", 2, 0, 4, torch.float32), r"expected positive n, c and hw, got 2, 0, 4"),
    (("coupling", 2, 3, 4, torch.int32), r"expected a floating-point dtype, got Int"),
    (("softmax", 2, 3, 4, torch.float32), r"expected kernel 'coupling', 'actnorm', 'conv1x1' or "
                                          r"'conv1x1_weight_grad', got 'softmax'"),
])
def test_cuda_launch_refuses_what_no_kernel_launches(native, args, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.flowkern._cuda_launch(*args)


def test_native_kernels_are_deterministic_across_thread_counts(native):
    x, h = torch.randn(3, 8, 33, 17), torch.randn(3, 8, 33, 17)
    upstream = torch.randn(3, 8, 33, 17)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            y, logdet = native.coupling_forward(x, h)
            grads = native.ops.conv1x1_weight_grad(upstream, x)
            results.append((y, logdet, *grads))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_flowkern_works_and_says_why_when_the_extension_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "flowkern._C", None)  # import of flowkern._C now fails
    monkeypatch.delattr(flowkern, "_C", raising=False)
    monkeypatch.delitem(sys.modules, "flowkern.backends.native", raising=False)
    monkeypatch.setattr(backends.registry, "_loaded", {k: v for k, v in backends.registry._loaded.items() if k != "native"})
    monkeypatch.setattr(backends.registry, "_reasons", {})
    monkeypatch.setattr(backends.auto, "_choices", {})
    status = flowkern.available_backends(with_reasons=True)
    assert "flowkern._C" in status["native"]
    assert "native" not in flowkern.available_backends()
    with pytest.raises(backends.BackendUnavailable, match="backend 'native' is unavailable"):
        flowkern.set_backend("native")
    step = flowkern.nn.FlowStep(4, 8)
    y, logdet = step(torch.randn(2, 4, 3, 3))
    assert y.shape == (2, 4, 3, 3)
    assert {choice.backend for choice in backends.auto_choices().values()} == {"reference"}


@pytest.mark.parametrize("scale", ["sigmoid", "exp"])
def test_cpu_vector_math_keeps_the_precision_of_the_dtype(native, scale):
    """The CPU kernels' own log1p (atanh series) and tanh (from one exp), across the whole range of raw:
    both branches of tanh, sigmoid scales from e^-40 to 1, in float64 and float32."""
    raw = torch.cat([torch.linspace(-40, 40, 4001), torch.linspace(-0.1, 0.1, 2001)]).double()
    raw = raw[torch.randperm(raw.numel())][: 6 * 1000].view(2, 3, 40, 25)
    h = torch.cat([raw, torch.randn_like(raw)], 1)
    x = torch.randn(2, 6, 40, 25, dtype=torch.float64)
    expected_y, expected_logdet = flowkern.reference.coupling_forward(x, h, "channel", 0, scale, 2.0)
    y, logdet = native.coupling_forward(x, h, "channel", 0, scale, 2.0)
    torch.testing.assert_close(logdet, expected_logdet, rtol=1e-13, atol=0)
    torch.testing.assert_close(y, expected_y, rtol=1e-13, atol=1e-13)
    y32, logdet32 = native.coupling_forward(x.float(), h.float(), "channel", 0, scale, 2.0)
    torch.testing.assert_close(logdet32.double(), expected_logdet, rtol=2e-6, atol=0)
    torch.testing.assert_close(y32.double(), expected_y, rtol=1e-5, atol=1e-5)


def test_an_extension_built_for_avx2_is_not_loaded_on_a_cpu_without_it(monkeypatch):
    from flowkern.backends.native import cpu_features

    with pytest.raises(RuntimeError, match="built for CPUs with AVX2, FMA, F16C, and this CPU lacks AVX2, FMA"):
        cpu_features.check_cpu_features(("avx2", "fma", "f16c"), {"sse2", "f16c"})
    cpu_features.check_cpu_features(("avx2",), {"avx2", "sse2"})
    cpu_features.check_cpu_features((), set())
    assert "sse2" in (cpu_features.cpu_features() or {"sse2"})  # every x86-64 CPU has it

    monkeypatch.setattr(cpu_features, "build_features", lambda: ("avx2", "fma", "f16c"))
    monkeypatch.setattr(cpu_features, "cpu_features", lambda: {"sse2"})
    monkeypatch.delitem(sys.modules, "flowkern.backends.native", raising=False)
    monkeypatch.setattr(backends.registry, "_loaded", {k: v for k, v in backends.registry._loaded.items() if k != "native"})
    monkeypatch.setattr(backends.registry, "_reasons", {})
    monkeypatch.setattr(backends.auto, "_choices", {})
    reason = flowkern.available_backends(with_reasons=True)["native"]
    assert "this CPU lacks AVX2, FMA, F16C; rebuild it on this machine" in reason
    y, _ = flowkern.nn.ActNorm(3)(torch.randn(2, 3, 4, 4))  # flowkern runs on without it
    assert backends.auto_choices()[("cpu", "actnorm_forward")].backend == "reference"
