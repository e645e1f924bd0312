# Everything runs inside .venv, created on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.flowkern-installed
BENCH_STAMP := $(VENV)/.flowkern-peers

# torch resolves to the local CUDA build here (it runs on the CPU and lets csrc/*.cu compile);
# triton ships with it on Linux and is listed for platforms where it does not.
DEPS := torch numpy triton pybind11 ninja pytest pytest-benchmark scikit-learn tqdm pillow matplotlib
# peer flow libraries, measured beside flowkern by the benchmark suite
PEERS := normflows FrEIA

.PHONY: setup test test-gpu bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet $(DEPS)
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

# the fused backends that must load, so that none of their tests is skipped
REQUIRE_BACKENDS ?= triton

test: setup
	FLOWKERN_REQUIRE_BACKENDS=$(REQUIRE_BACKENDS) $(PY) -m pytest tests

# only the tests that need a CUDA device (bfloat16 kernels, ...); `make test` on a GPU machine runs them too
test-gpu: setup
	FLOWKERN_REQUIRE_BACKENDS=$(REQUIRE_BACKENDS) $(PY) -m pytest -m gpu tests

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet $(PEERS)
	touch $@

bench: $(BENCH_STAMP)
	$(PY) -m benchmarks.run $(BENCH_ARGS)
	$(PY) -m benchmarks.report --readme README.md

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
