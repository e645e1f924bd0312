"""The benchmark runner measures, reports and renders (timings themselves are the suite's business)."""
import json

import torch

from benchmarks import cases as suite
from benchmarks import report, run


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
