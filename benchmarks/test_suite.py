"""The benchmark suite under pytest-benchmark: ``pytest benchmarks --benchmark-only``.

Same cases and providers as ``python -m benchmarks.run``; pytest-benchmark keeps the statistics.
"""
import pytest
import torch

import flowkern

from . import cases as suite

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = suite.all_cases(DEVICE)
PARAMS = [pytest.param(case, provider, id=f"{case.label}-{provider}".replace(" ", "-"))
          for case in CASES for provider in suite.providers()]


@pytest.mark.parametrize("case,provider", PARAMS)
def test_benchmark(benchmark, case, provider):
    with flowkern.use_backend(suite.backend_of(provider)):
        fn = case.build(provider)
        if fn is None:
            pytest.skip(f"{provider} has no counterpart of {case.name}")
        if DEVICE.type == "cuda":
            def run():
                fn()
                torch.cuda.synchronize()
        else:
            run = fn
        benchmark.extra_info.update(case.params, provider=provider, bytes_moved=case.bytes_moved)
        benchmark.pedantic(run, warmup_rounds=3, rounds=20, iterations=1)
