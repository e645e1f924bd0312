"""The benchmark runner measures, reports and renders (timings themselves are the suite's business)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import flowkern
from benchmarks import cases as suite
from benchmarks import measure, report, run


def test_runner_measures_a_case_and_writes_reports(tmp_path):
    device = torch.device("cpu")
    case = next(c for c in suite.all_cases(device) if c.name == "coupling_forward")
    rows = run.measure_case(case, ["eager"], device, bandwidth=10.0, min_time=0.01)
    (row,) = rows
    assert row["median_ms"] > 0 and row["p10_ms"] <= row["median_ms"] <= row["p90_ms"]
    assert row["speedup_vs_eager"] == 1.0
    assert row["bandwidth_gbs"] == case.bytes_moved / (row["median_ms"] / 1e3) / 1e9
    assert row["peak_mb"] > 0 and row["aten_ops"] > 0
    env = run.environment(device, 10.0)
    data = {"environment": env, "command": "python -m benchmarks.run",
            "results": [{"case": case.name, "label": case.label, "params": case.params,
                         "bytes_moved": case.bytes_moved, "rows": rows}]}
    paths = report.write_reports(data, str(tmp_path))
    assert json.load(open(paths[0]))["results"][0]["rows"][0]["provider"] == "eager"
    assert "| eager |" in open(paths[1]).read()
    assert open(paths[2], "rb").read(4) == b"\x89PNG"


def test_peak_memory_counts_live_allocations():
    x = torch.randn(1000, 1000)

    def chain():
        y = x * 2            # 4 MB
        z = y + 1            # 8 MB live
        del y
        return (z * 3).sum()  # 8 MB live again

    from benchmarks.measure import profile_call

    peak = profile_call(chain, torch.device("cpu"))["peak_mb"] * 2 ** 20
    assert 8e6 <= peak < 8.1e6


def test_calls_are_timed_in_turn():
    calls = []
    times = measure.time_calls([lambda: calls.append("a"), lambda: calls.append("b")], torch.device("cpu"),
                               warmup=1, min_time=0.0, min_reps=3)
    assert calls == ["a", "b"] * 4 and [len(t) for t in times] == [3, 3]


def test_a_case_with_a_baseline_is_timed_in_turn_with_it_and_tabulated():
    device = torch.device("cpu")
    (case,) = suite.inversion_cases(2, 3, 8, 2, 4, (2,), torch.float32, device, eager=True)
    (row,) = run.measure_case(case, ["eager"], device, bandwidth=10.0, min_time=0.0)
    if "error" in row:
        raise AssertionError(row["error"])
    base = row["baseline"]
    assert base["reps"] == row["reps"] and base["median_ms"] > 0 and 0 < row["ratio_to_baseline"]
    table = report.inversion_table({"results": [{"case": case.name, "params": case.params, "rows": [row]}]})
    (line,) = table.splitlines()[2:]
    assert line.startswith(f"| 2 | 4 | {row['provider']} | {base['peak_mb']:.1f} | {row['peak_mb']:.1f} |")
    assert line.endswith(f"| {row['ratio_to_baseline']:.2f}× |")


def test_whole_model_cases_run_for_every_provider_and_compare_with_plain_pytorch():
    device = torch.device("cpu")
    for case in suite.glow_cases(2, 3, 8, 2, 1, 4, torch.float32, device):
        providers = [p for p in case.providers if not p.endswith("compile")]  # compiling takes minutes
        rows = run.measure_case(case, providers, device, bandwidth=10.0, min_time=0.0)
        errors = [row["error"] for row in rows if "error" in row]
        assert not errors, errors
        by_name = {row["provider"]: row for row in rows}
        assert {"plain eager", "flowkern", "flowkern reference"} <= set(by_name)
        assert ("flowkern by inversion" in by_name) == (case.name == "glow_train_step")
        assert by_name["plain eager"]["speedup_vs_eager"] == 1.0
        for row in rows:
            assert row["first_call_s"] > 0 and 0 < row["conv_share"] < 1
            assert row["speedup_vs_eager"] == by_name["plain eager"]["median_ms"] / row["median_ms"]
            assert row["ops_per_flow_step"] > 0 and row["host_syncs"] >= 0
        # the plain Glow reads its ActNorm flags back in every step; flowkern's training step reads nothing
        assert by_name["plain eager"]["host_syncs"] > 0
        if case.name == "glow_train_step":
            assert by_name["flowkern"]["host_syncs"] == by_name["flowkern by inversion"]["host_syncs"] == 0
        table = report.markdown({"environment": run.environment(device, 10.0), "command": "",
                                 "results": [{"case": case.name, "label": case.label, "versus": list(case.versus),
                                              "rows": rows}]})
        assert "| vs plain eager | vs plain compile |" in table and "| ops per flow step | host syncs |" in table


def test_whole_model_cases_under_autocast_run_for_the_plain_and_flowkern_providers():
    device = torch.device("cpu")
    for case in suite.glow_cases(2, 3, 8, 2, 1, 4, torch.float32, device, autocast=torch.bfloat16):
        assert case.params["autocast"] == "bfloat16" and "autocast=bfloat16" in case.label
        providers = [p for p in case.providers if not p.endswith("compile")]
        rows = run.measure_case(case, providers, device, bandwidth=10.0, min_time=0.0)
        assert [row["provider"] for row in rows if "error" not in row] == ["plain eager", "flowkern"]


def test_the_conditioner_case_times_both_forms():
    device = torch.device("cpu")
    (case,) = suite.conditioner_cases(2, 3, 5, 8, torch.float32, device)
    rows = run.measure_case(case, list(case.providers), device, bandwidth=10.0, min_time=0.0)
    assert [row["provider"] for row in rows] == list(suite.CONDITIONER_PROVIDERS)
    assert all("median_ms" in row and row["conv_share"] > 0 for row in rows)


def test_occupancy_follows_the_h100_limits():
    from benchmarks.gpu_check import blocks_per_sm

    assert blocks_per_sm(32, 128, 0) == 16  # 4 warps of 32 registers: the 64-warp limit
    assert blocks_per_sm(128, 128, 0) == 4  # 128 × 128 = 16K registers a block, 64K an SM
    assert blocks_per_sm(255, 128, 0) == 2  # 255 rounds up to 256 a thread (in 256-register warp units)
    assert blocks_per_sm(40, 256, 48 * 1024) == 4  # (48 + 1) KB a block of the 228 KB
    assert blocks_per_sm(40, 128, 228 * 1024) == 0  # beyond the 227 KB a block may have: cannot launch


SM90_COUPLING = """
import torch
from benchmarks import gpu_check
modules, compiled = gpu_check._triton_modules(), []
with gpu_check.compiling_for_sm90(modules, compiled):
    for dtype in (torch.float64, torch.float32):
        x, h = torch.randn(2, 4, 8, 8, dtype=dtype), torch.randn(2, 8, 8, 8, dtype=dtype)
        modules["coupling"].launch_coupling_forward(x, h, "checkerboard", 0, "exp", 0.3, "halves")
for name, constexprs, grid, kernel in compiled:
    ptx = kernel.asm["ptx"]
    print(constexprs["ACC"], ".param .f64" in ptx, "cvt.rn.f32.f64" in ptx, gpu_check.ptxas_resources(ptx)[1])
"""


def test_the_couplings_compile_for_sm90_with_a_float64_bound():
    """Compiled for an H100 without one (the machinery of ``make gpu-check``): the bound reaches the kernel
    as a float64 (a Python float argument would pass as float32, which the interpreter does not show), is
    rounded only in float32 kernels, and nothing spills."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", SM90_COUPLING], capture_output=True, text=True, env=env,
                         cwd=root, check=True).stdout.split("\n")
    assert out[:2] == ["fp64 True False 0", "fp32 True True 0"], out


def test_the_model_charges_launches_and_too_little_in_flight():
    from benchmarks import gpu_model

    moved = 30e6
    floor = moved / gpu_model.COPY_BANDWIDTH
    enough = dict(kernel="k", programs=132 * 8, threads=256, registers=32, spills=0, shared=0,
                  bytes=1 << 20, ahead=1, extra=0)
    fraction, figures = gpu_model.estimate("actnorm", torch.float32, moved, enough)
    assert figures["per_sm"] == 8 and figures["latency_bound"] == 1.0 and figures["wave_efficiency"] == 1.0
    assert fraction == pytest.approx(floor / (floor + gpu_model.LAUNCH_COST))
    # a quarter of the bytes in flight that streaming needs, and one partial sum launched beside the kernel
    starved = dict(enough, bytes=gpu_model.COPY_BANDWIDTH * gpu_model.LATENCY / (4 * 132 * 8), extra=1)
    fraction, figures = gpu_model.estimate("actnorm", torch.float32, moved, starved)
    assert figures["latency_bound"] == pytest.approx(0.25)
    assert fraction == pytest.approx(floor / (4 * floor + 2 * gpu_model.LAUNCH_COST))


def test_the_model_finds_each_cuda_kernel_it_describes_in_the_extension():
    """The model names each CUDA kernel it describes by its template: each must name one kernel of the built
    extension, so a renamed or re-templated kernel fails here rather than silently leaving the model. Grids
    come from the extension (flowkern::_cuda_launch), the arithmetic the launchers use."""
    from benchmarks import gpu_check, gpu_model

    kernels, _, skipped = gpu_check.check_cuda()
    if skipped:
        pytest.skip(f"CUDA kernels not built: {skipped}")
    ops = ("coupling_forward", "coupling_backward", "actnorm", "actnorm_backward", "conv1x1", "conv1x1_weight_grad")
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for c, size in gpu_model.SHAPES + [(384, 16)]:
            for op in ops:
                launch = gpu_model.cuda_launch(op, dtype, 64, c, size * size, kernels)
                assert launch["programs"] > 0 and launch["spills"] == 0, (op, dtype, c)
    coupling = gpu_model.cuda_launch("coupling_forward", torch.float32, 64, 48, 32 * 32, kernels)
    assert coupling["programs"] == 64 * 48  # one block per sample, channel and 1024 pixels
    wide = gpu_model.cuda_launch("conv1x1", torch.float32, 64, 384, 16 * 16, kernels)
    assert wide["kernel"] == "conv1x1_kernel" and wide["shared"] < 48 * 1024  # Wᵀ too large: read from L1/L2


def test_the_model_is_checked_against_a_device_by_one_command(tmp_path):
    """benchmarks.gpu_validate times each op the model describes, as the model calls it, and sets each beside
    the model's estimate; on the CPU (eager only, no CUDA graphs) this checks the script, and that every row
    it will measure on a GPU finds its estimate in the committed model."""
    from benchmarks import gpu_model, gpu_validate
    from flowkern import backends

    rows = gpu_validate.main(["--device", "cpu", "--batch", "2", "--backends", "native", "--min-time", "0.001",
                              "--out", str(tmp_path)])
    ops = [op for op, _, _ in gpu_model.op_calls(backends._load("native").ops, 1, 4, 2, torch.float32)]
    assert [(r["op"], r["dtype"], r["C"]) for r in rows] == [
        (op, str(dtype).replace("torch.", ""), c) for dtype in gpu_model.DTYPES for c, _ in gpu_model.SHAPES
        for op in ops]
    assert all(r["eager"] > 0 and r["eager_us"] > 0 and r["model"] is None and "graph" not in r for r in rows)
    assert (tmp_path / "validate.md").read_text().count("| native |") == len(rows)
    model = gpu_validate.estimates(64)
    for backend in gpu_validate.MODEL_BACKENDS.values():
        for row in rows:
            assert (backend, row["op"], row["dtype"], row["C"], row["HW"]) in model


def test_the_graphed_training_step_script_runs_its_eager_providers_on_the_cpu(tmp_path):
    """benchmarks.gpu_step (a step of tools/gpu_session.sh) times the plain and flowkern Glow's training steps;
    on the CPU the CUDA graph is skipped, which checks the script's models, steps and report."""
    from benchmarks import gpu_step

    stats, checks = gpu_step.main(["--device", "cpu", "--levels", "2", "--steps", "1", "--hidden", "8", "--batch",
                                   "2", "--size", "8", "--min-time", "0.001", "--out", str(tmp_path)])
    assert list(stats) == ["plain eager", "flowkern eager"] and checks == {}
    assert all(s["median_ms"] > 0 and s["reps"] >= 5 for s in stats.values())
    assert (tmp_path / "step.md").read_text().count("| flowkern eager |") == 1


def test_the_step_projection_counts_each_providers_ops_and_bounds_the_step():
    """benchmarks.gpu_projection counts the ops a step dispatches (flowkern's fewer than the plain Glow's,
    training by inversion more than backprop) and sets their host time beside the device floor."""
    from benchmarks import gpu_projection

    if "native" not in flowkern.available_backends():
        pytest.skip("the native backend is not built")
    rows = {(r["provider"], r["mode"]): r for r in gpu_projection.project(2, 2, 512, 64)}
    assert list(rows) == [("plain eager", "train"), ("plain eager", "sample"), ("flowkern", "train"),
                          ("flowkern", "sample"), ("flowkern by inversion", "train")]
    assert rows["flowkern", "train"]["ops"] < rows["plain eager", "train"]["ops"]
    assert rows["flowkern", "train"]["ops"] < rows["flowkern by inversion", "train"]["ops"]
    assert rows["flowkern", "sample"]["ops"] < rows["plain eager", "sample"]["ops"]
    train, inversion = rows["flowkern", "train"], rows["flowkern by inversion", "train"]
    assert 0 < train["device_s"] < inversion["device_s"] and train["host_s"][0] < train["host_s"][1]
    assert "| flowkern | sample |" in gpu_projection.table(list(rows.values()))


def test_the_model_comparison_trains_each_model_by_the_command(tmp_path):
    from benchmarks import compare_models

    compared = compare_models.compare("moons", 2, 32, str(tmp_path))
    rows = [row for row, _ in compared]
    assert [r["model"] for r in rows] == ["realnvp2d", "ffjord"]
    assert abs(rows[0]["parameters"] - rows[1]["parameters"]) < 0.1 * rows[0]["parameters"]  # similar sizes
    assert all(math.isfinite(r["test_nll_nats"]) and r["step_ms"] > 0 and r["sample_ms"] > 0 for r in rows)
    assert rows[0]["nfe_forward"] is None and rows[1]["nfe_forward"] > 0 and rows[1]["sample_nfe"] > 0
    assert "| moons | ffjord |" in compare_models.table(rows)
    compare_models.plot_densities("moons", [(r["model"], m) for r, m in compared], torch.randn(100, 2),
                                  str(tmp_path / "density.png"), grid=8)
    assert (tmp_path / "density.png").stat().st_size > 0


def test_the_sm90_check_compiles_every_coupling_scale():
    from benchmarks import gpu_check

    assert {scale for scale, _ in gpu_check.COUPLING_VARIANTS} == set(flowkern.reference.SCALES)
