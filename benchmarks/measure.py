"""Timing, peak memory, op/kernel counts, dispatched ops and host reads, and the copy-bandwidth ceiling, on CPU or
CUDA."""
import collections
import contextlib
import functools
import os
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@functools.lru_cache(maxsize=None)
def _l2_flusher(device):
    """A buffer twice the size of ``device``'s L2 cache: writing it evicts whatever a previous call left."""
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 * 2 ** 20
    return torch.empty(2 * l2, dtype=torch.uint8, device=device)


def _seconds(fn, device):
    """One call's time: CUDA events on a GPU, with the L2 cache flushed before the call (outside the timed
    span: on a 50 MB L2 a repeated call would otherwise read its inputs from cache), a monotonic clock on
    the CPU."""
    if device.type == "cuda":
        _l2_flusher(device).zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_calls(fns, device, warmup=3, min_time=0.5, min_reps=10, max_reps=1000, contexts=None):
    """Per-call times in seconds of each of ``fns``, after warm-up. The functions are called in turn, so
    that drift in the machine's speed during the measurement affects all of them alike. ``contexts[i]()``,
    if given, is a context manager that each call of ``fns[i]`` runs in, entered outside the timed span."""
    contexts = contexts or [contextlib.nullcontext] * len(fns)
    for _ in range(warmup):
        for fn, context in zip(fns, contexts):
            with context():
                fn()
    synchronize(device)
    times, spent = [[] for _ in fns], 0.0
    while len(times[0]) < max_reps and (len(times[0]) < min_reps or spent < min_time):
        for fn, series, context in zip(fns, times, contexts):
            with context():
                series.append(_seconds(fn, device))
            spent += series[-1]
    return times


def time_call(fn, device, **limits):
    """Per-call times in seconds of ``fn`` after warm-up (see :func:`time_calls`)."""
    return time_calls([fn], device, **limits)[0]


def summarize(times):
    """Median and the 10th/90th percentiles, in milliseconds."""
    ordered = sorted(times)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"median_ms": statistics.median(ordered) * 1e3, "p10_ms": pick(0.1) * 1e3,
            "p90_ms": pick(0.9) * 1e3, "reps": len(ordered)}


def profile_call(fn, device):
    """Peak memory allocated during one call (bytes above the level before it), and the number of
    kernels launched (CUDA) or of top-level aten ops dispatched (CPU, where compiled code runs none)."""
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    else:
        activities = [ProfilerActivity.CPU]
    with _quiet_stderr(), profile(activities=activities, profile_memory=device.type == "cpu") as prof:
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        wall_us = (time.perf_counter() - t0) * 1e6
    events = prof.events()
    share = {"conv_share": convolution_time_us(events, device) / wall_us}
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
        kernels = sum(1 for e in events if e.device_type.name == "CUDA")
        return {"peak_mb": peak / 2 ** 20, "launches": kernels, **share}
    aten_ops = sum(1 for e in events if e.name.startswith("aten::")
                   and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))
    return {"peak_mb": cpu_peak_bytes(prof) / 2 ** 20, "aten_ops": aten_ops, **share}


class _Dispatches(TorchDispatchMode):
    """Counts the ops dispatched below autograd that launch work, and those that read a value back to the host."""

    # allocations (no kernel runs) and ops that read a value back (each waits for the device)
    ALLOCATIONS = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh")
    HOST_READS = ("_local_scalar_dense", "is_nonzero", "equal")

    def __init__(self):
        super().__init__()
        self.ops, self.host_reads = collections.Counter(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.HOST_READS:
            self.host_reads += 1
        elif not func.is_view and name not in self.ALLOCATIONS:  # a view or an alias launches nothing
            self.ops[func._schema.name.removeprefix("aten::")] += 1
        return func(*args, **(kwargs or {}))


def count_dispatches(fn) -> dict:
    """The work one eager call of ``fn`` dispatches: ``ops``, the ops that launch work (each at least one
    kernel on a GPU: views, aliases and allocations not counted; a registered flowkern op counts once),
    ``host_syncs``, the ops that read a value back to the host (``.item()``, ``bool(t)``, ``torch.equal``),
    and ``by_op``, the count of each op. Deterministic for a given model and input, unlike times."""
    with _Dispatches() as mode:
        fn()
    return {"ops": sum(mode.ops.values()), "host_syncs": mode.host_reads, "by_op": dict(mode.ops)}


# convolutions, and the matrix products (with the patch gathering) that compute them where taken instead
CONVOLUTIONS = ("aten::convolution", "aten::convolution_backward", "aten::mm", "aten::addmm", "aten::bmm",
                "aten::im2col", "aten::col2im")


def convolution_time_us(events, device):
    """Time spent in convolutions and matrix products, forward and backward, in a profiled call: the CPU
    time of the outermost such ops on the CPU, the device time of their kernels on a GPU."""
    total = 0.0
    for e in events:
        if e.name not in CONVOLUTIONS:
            continue
        parent = e.cpu_parent
        while parent is not None and parent.name not in CONVOLUTIONS:
            parent = parent.cpu_parent
        if parent is None:
            total += e.device_time_total if device.type == "cuda" else e.cpu_time_total
    return total


def cpu_peak_bytes(prof):
    """Highest level of CPU memory allocated inside a profiled region, above its starting level, from the
    profiler's allocation records (``profile_memory=True``)."""
    records = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    level = peak = 0
    for record in sorted(records, key=lambda e: e.start_ns()):
        level += record.nbytes()
        peak = max(peak, level)
    return peak


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's C++ side logs each start and stop to file descriptor 2; keep the tables readable."""
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def copy_bandwidth(device, megabytes=None):
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written over time), median of runs."""
    megabytes = megabytes or (1024 if device.type == "cuda" else 256)
    src = torch.randn(megabytes * 2 ** 18, device=device)
    dst = torch.empty_like(src)
    times = time_call(lambda: dst.copy_(src), device, warmup=3, min_reps=20, min_time=0.5)
    return 2 * src.numel() * src.element_size() / statistics.median(times) / 1e9
