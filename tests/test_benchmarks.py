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


def test_inversion_table_pairs_each_depth_with_its_standard_step():
    def result(case, k, provider, mb, ms):
        params = {"N": 16, "K": k, "L": 3, "hidden": 64}
        return {"case": case, "label": case, "params": params,
                "rows": [{"provider": provider, "median_ms": ms, "peak_mb": mb}]}
    standard, saving = suite.DEPTH_CASES
    table = report.inversion_table({"results": [
        result(standard, 4, "native", 20.0, 100.0), result(standard, 32, "native", 160.0, 800.0),
        result(saving, 4, "native", 5.0, 130.0), result(saving, 32, "native", 5.0, 1080.0),
        result(standard, 8, "native", 40.0, 200.0)]})  # no inversion row at K=8: left out
    rows = table.splitlines()[2:]
    assert rows == ["| glow_train_by_depth | 4 | 64 | native | 20.0 | 5.0 | 25.0% | 100 | 130 | 1.30× |",
                    "| glow_train_by_depth | 32 | 64 | native | 160.0 | 5.0 | 3.1% | 800 | 1080 | 1.35× |"]
