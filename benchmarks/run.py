"""Run the benchmarks: one table per case, results under ``benchmarks/results/<device>/``.

    python -m benchmarks.run                  # the headline cases (about 10 minutes on a 2-core CPU)
    python -m benchmarks.run --full           # every case (about half an hour on a 2-core CPU)
    python -m benchmarks.run --real-shapes    # the real Glow shapes (the default on a GPU)
    python -m benchmarks.run --full --cases coupling --providers eager,compile

It prints the cases it will run with an estimate of the time they take (each case as long as in the last run
on this device, where there is one) and a progress bar through them.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
import warnings

import torch
import torch._inductor.config
import tqdm

import flowkern

from . import cases as suite
from .measure import copy_bandwidth, count_dispatches, profile_call, summarize, time_calls
from .report import RESULTS, write_reports


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} {os.cpu_count()}-core CPU ({cpu_description()})"


def cpu_description():
    """The CPU's model, the vector instructions torch's CPU kernels use on it and, where /proc/cpuinfo says,
    whether it has bfloat16 instructions: CPUs of one architecture differ by several times in bfloat16."""
    model, flags = platform.processor() or platform.machine(), None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = (part.strip() for part in line.partition(":"))
                if key == "model name":
                    model = value
                elif key == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    parts = [model, torch.backends.cpu.get_cpu_capability()]
    if flags is not None:
        parts.append("bfloat16 instructions" if flags & {"avx512_bf16", "amx_bf16"} else "no bfloat16 instructions")
    return ", ".join(parts)


def device_slug(device):
    """The results folder's name: the GPU's name, or the CPU's core count and model."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu-{os.cpu_count()}core-{cpu_description().split(',')[0]}"
    for mark in ("(r)", "(tm)", " processor", " cpu"):  # Intel(R) Xeon(R) Processor -> intel-xeon
        name = name.lower().replace(mark, "")
    slug = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in name.lower())
    while "--" in slug:
        slug = slug.replace("--", "-")
    return slug.strip("-")


def git_commit():
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                              cwd=os.path.dirname(__file__), check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(device, bandwidth):
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(device), "device_type": device.type, "torch": torch.__version__,
        "triton": triton_version, "flowkern": flowkern.__version__, "python": platform.python_version(),
        "commit": git_commit(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "threads": torch.get_num_threads(), "copy_bandwidth_gbs": bandwidth,
        "backends": flowkern.available_backends(with_reasons=True),
    }


def _build(case, provider, device):
    """``(fn, baseline, first)``: what ``provider`` runs for ``case`` and its baseline (``fn`` None where
    the provider has no counterpart), and the time of ``fn``'s first call, compilation included."""
    torch._dynamo.reset()  # every compiled provider compiles afresh, and none hits the recompilation limit
    with flowkern.use_backend(suite.backend_of(provider)):
        fn = case.build(provider)
        if fn is None:
            return None, None, None
        first = time_calls([fn], device, warmup=0, min_time=0.0, min_reps=1)[0][0]
        baseline = case.baseline(provider) if case.baseline is not None else None
    return fn, baseline, first


def measure_case(case, providers, device, bandwidth, min_time, built=lambda provider: None):
    """One row per provider. The providers' calls (and their baselines') are timed in turn, round-robin,
    so that drift in the machine's speed affects them alike. ``built(provider)`` is called as each provider's
    first call (its compilation) is done."""
    rows, timed = [], []
    for provider in providers:
        if rows:
            built(rows[-1]["provider"])
        row = {"provider": provider}
        try:
            fn, baseline, first = _build(case, provider, device)
            if fn is None:
                continue
            row["first_call_s"] = first
            timed.append((row, fn, baseline))
        except Exception as exc:  # one failing provider must not hide the others' numbers
            row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
            traceback.print_exc(file=sys.stderr)
        rows.append(row)
    if rows:
        built(rows[-1]["provider"])

    def backend(row):
        return lambda: flowkern.use_backend(suite.backend_of(row["provider"]))

    calls = [(f, backend(row)) for row, fn, baseline in timed for f in (fn, baseline) if f is not None]
    times = iter(time_calls([f for f, _ in calls], device, min_time=min_time, contexts=[c for _, c in calls]))
    for row, fn, baseline in timed:
        own = next(times)
        row.update(summarize(own))
        with backend(row)():
            row.update(profile_call(fn, device))
            if case.flow_steps and not row["provider"].endswith("compile"):  # eager dispatches: what a GPU launches
                counts = count_dispatches(fn)
                row.update(ops_per_flow_step=counts["ops"] / case.flow_steps, host_syncs=counts["host_syncs"])
            if case.graph_breaks is not None and (breaks := case.graph_breaks(row["provider"])) is not None:
                row["graph_breaks"] = breaks
            if baseline is not None:
                base = next(times)
                row["baseline"] = {**summarize(base), **profile_call(baseline, device)}
                row["ratio_to_baseline"] = statistics.median(t / b for t, b in zip(own, base))
    by_name = {r["provider"]: r for r in rows if "median_ms" in r}
    for row in rows:
        if "median_ms" not in row:
            continue
        for column, base in zip(("eager", "compile"), case.versus):
            if base in by_name:
                row[f"speedup_vs_{column}"] = by_name[base]["median_ms"] / row["median_ms"]
        if case.bytes_moved:
            gbs = case.bytes_moved / (row["median_ms"] / 1e3) / 1e9
            row["bandwidth_gbs"] = gbs
            row["fraction_of_copy"] = gbs / bandwidth
    return rows


def format_table(case, rows):
    header = f"{case.label}" + (f"  ({case.bytes_moved / 2 ** 20:.1f} MiB to move)" if case.bytes_moved else "")
    count = "aten_ops" if any("aten_ops" in r for r in rows) else "launches"
    width = max(11, 2 + max((len(r["provider"]) for r in rows), default=0))
    versus = [f"vs {name}" for name in case.versus]
    lines = [header, f"  {'provider':<{width}}{'median ms':>11}{'p10..p90 ms':>19}{versus[0]:>15}{versus[1]:>15}"
                     f"{'GB/s':>7}{'of copy':>9}{'peak MiB':>10}{count:>10}{'conv':>6}{'first s':>9}"
                     + (f"{'ops/step':>10}{'syncs':>7}" if case.flow_steps else "")
                     + (f"{'breaks':>8}" if case.graph_breaks else "")]
    for r in rows:
        if "error" in r:
            lines.append(f"  {r['provider']:<{width}}failed: {r['error']}")
            continue
        opt = lambda key, fmt, unit="": format(r[key], fmt) + unit if key in r else "-"  # noqa: E731
        lines.append(
            f"  {r['provider']:<{width}}{r['median_ms']:>11.3f}{r['p10_ms']:>9.3f}..{r['p90_ms']:<8.3f}"
            f"{opt('speedup_vs_eager', '.2f', 'x'):>15}{opt('speedup_vs_compile', '.2f', 'x'):>15}"
            f"{opt('bandwidth_gbs', '.1f'):>7}{opt('fraction_of_copy', '.0%'):>9}"
            f"{r['peak_mb']:>10.1f}{r.get(count, '-'):>10}{opt('conv_share', '.0%'):>6}{opt('first_call_s', '.2f'):>9}"
            + (f"{opt('ops_per_flow_step', '.1f'):>10}{opt('host_syncs', 'd'):>7}" if case.flow_steps else "")
            + (f"{opt('graph_breaks', 'd'):>8}" if case.graph_breaks else ""))
        if "baseline" in r:
            b = r["baseline"]
            lines.append(f"    its baseline: {b['median_ms']:.3f} ms ({b['p10_ms']:.3f}..{b['p90_ms']:.3f}), "
                         f"peak {b['peak_mb']:.1f} MiB; time ratio {r['ratio_to_baseline']:.3f} "
                         f"(median over calls in turn)")
    return "\n".join(lines)


def _previous_seconds(folder):
    """{case label: (seconds its measurement took, its providers)} in the last run whose results are in
    ``folder``."""
    try:
        with open(os.path.join(folder, "results.json")) as f:
            report = json.load(f)
    except (OSError, ValueError):
        return {}
    return {result["label"]: (result["seconds"], [row["provider"] for row in result["rows"]])
            for result in report.get("results", []) if "seconds" in result}


def _estimate(case, providers, previous):
    """Seconds ``case`` takes with ``providers``: as long as in the last run with as many providers, or a guess
    (compilation is most of it)."""
    seconds, measured = previous.get(case.label, (None, None))
    if seconds is not None and measured == list(providers):
        return seconds
    return sum(90.0 if p.endswith("compile") else 15.0 for p in providers)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="every case, not only the headline ones")
    parser.add_argument("--real-shapes", action="store_true", help="real Glow shapes (default on a GPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cases", default="", help="comma-separated substrings of the labels of the cases to run "
                        "(a case's name and parameters, as its table's title shows them)")
    parser.add_argument("--providers", default="", help="comma-separated providers (default: all)")
    parser.add_argument("--min-time", type=float, default=None, help="seconds of timed calls per row")
    parser.add_argument("--out", default=None, help="results folder (default results/<device>)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    torch.manual_seed(0)
    torch._inductor.config.force_disable_caches = True  # each first call is a first compilation
    warnings.filterwarnings("ignore", message=".*torch.lu is deprecated")  # raised inside a peer library
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch")
    providers = suite.providers()
    chosen = args.providers.split(",") if args.providers else None
    cases = (suite.all_cases if args.full else suite.headline_cases)(device, real_shapes=args.real_shapes)
    if args.cases:
        cases = [c for c in cases if any(s in c.label for s in args.cases.split(","))]
    min_time = args.min_time if args.min_time is not None else (1.0 if device.type == "cuda" else 0.3)
    out = args.out or os.path.join(RESULTS, device_slug(device))
    plan = [(case, [p for p in case.providers or providers if chosen is None or p in chosen]) for case in cases]
    plan = [(case, own) for case, own in plan if own]  # --providers may name none of a case's

    bandwidth = copy_bandwidth(device)
    env = environment(device, bandwidth)
    log = []

    def say(text=""):  # printed, and kept for the run's log
        print(text, flush=True)
        log.append(text)

    say(f"flowkern benchmarks on {env['device']}: torch {env['torch']}, triton {env['triton']}, "
          f"commit {env['commit']}, copy bandwidth {bandwidth:.1f} GB/s")
    say(f"providers: {', '.join(providers)}; whole-model cases: {', '.join(suite.MODEL_PROVIDERS)}\n")
    previous = _previous_seconds(out)
    estimates = [_estimate(case, own, previous) for case, own in plan]
    say(f"{len(plan)} cases, about {sum(estimates) / 60:.1f} min" + (" (from the last run on this device)"
                                                                       if previous else "") + ":")
    for (case, own), estimate in zip(plan, estimates):
        say(f"  {case.label}: {len(own)} providers, ~{estimate:.0f} s")
    say()
    results = []
    with tqdm.tqdm(total=round(sum(estimates)), unit="s", file=sys.stderr, dynamic_ncols=True,
                   bar_format="{l_bar}{bar}| {elapsed} of ~{total} s estimated") as progress:
        done = 0.0
        for (case, own), estimate in zip(plan, estimates):
            progress.set_description(case.name)
            start = time.perf_counter()
            rows = measure_case(case, own, device, bandwidth, min_time,
                                built=lambda provider: progress.update(round(0.5 * estimate / len(own))))
            results.append({"case": case.name, "label": case.label, "params": case.params,
                            "bytes_moved": case.bytes_moved, "versus": list(case.versus), "rows": rows,
                            "seconds": time.perf_counter() - start})
            done += estimate
            progress.update(round(done) - progress.n)  # the rest of the case's share: its timed calls
            with tqdm.tqdm.external_write_mode(file=sys.stderr):
                say(format_table(case, rows) + "\n")

    command = " ".join(["python -m benchmarks.run", *(argv or sys.argv[1:])])
    paths = write_reports({"environment": env, "command": command, "results": results}, out)
    paths.append(os.path.join(out, "run.log"))
    with open(paths[-1], "w") as f:
        f.write("\n".join([f"$ {command}", *log]) + "\n")
    print("wrote", ", ".join(paths))


if __name__ == "__main__":
    main()
