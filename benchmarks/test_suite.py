"""The benchmark suite under pytest-benchmark: ``pytest benchmarks --benchmark-only``.

Same cases and providers as ``python -m benchmarks.run``; pytest-benchmark keeps the statistics.
"""
import pytest
import torch

import flowkern

from . import cases as suite

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = suite.all_cases(DEVICE)
PARAMS = [pytest.param(case, provider, baseline, id=f"{case.label}-{provider}{suffix}".replace(" ", "-"))
          for case in CASES for provider in case.providers or suite.providers()
          for baseline, suffix in ((False, ""), (True, "-baseline"))[:1 + (case.baseline is not None)]]


@pytest.mark.parametrize("case,provider,baseline", PARAMS)
def test_benchmark(benchmark, case, provider, baseline):
    with flowkern.use_backend(suite.backend_of(provider)):
        fn = (case.baseline if baseline else case.build)(provider)
        if fn is None:
            pytest.skip(f"{provider} has no counterpart of {case.name}")
        if DEVICE.type == "cuda":
            def run():
                fn()
                torch.cuda.synchronize()
        else:
            run = fn
        benchmark.extra_info.update(case.params, provider=provider, baseline=baseline, bytes_moved=case.bytes_moved)
        benchmark.pedantic(run, warmup_rounds=3, rounds=20, iterations=1)
