# Everything runs inside .venv, created on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.flowkern-deps
STAMP := $(VENV)/.flowkern-installed
PEERS_STAMP := $(VENV)/.flowkern-peers
CMAKE_BUILD := build/cmake

# torch resolves to the local CUDA build here (it runs on the CPU and lets csrc/*.cu compile);
# triton ships with it on Linux and is listed for platforms where it does not.
DEPS := torch numpy triton pybind11 ninja cmake pytest pytest-benchmark scikit-learn tqdm pillow matplotlib torchdiffeq
# peer flow libraries: flowkern.accelerate's conformance tests run against them, the benchmark suite measures them
PEERS := normflows FrEIA nflows
CSRC := $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h csrc/*/*.cuh)

# the fused backends that must load, so that none of their tests is skipped
REQUIRE_BACKENDS ?= triton,native

.PHONY: setup test test-gpu ctest gpu-check gpu-check-update bench bench-full clean

setup: $(STAMP)

$(DEPS_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet $(DEPS)
	touch $@

# flowkern in editable mode, building flowkern._C (CUDA kernels too when torch has CUDA and nvcc is found)
$(STAMP): $(DEPS_STAMP) setup.py tools/cuda_toolkit.py $(CSRC)
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

test: setup $(PEERS_STAMP) ctest gpu-check
	FLOWKERN_REQUIRE_BACKENDS=$(REQUIRE_BACKENDS) FLOWKERN_REQUIRE_PEERS=normflows,FrEIA,nflows $(PY) -m pytest tests

# every Triton kernel compiled for the H100 (sm_90) without a GPU, and the CUDA kernels' resources; fails on a
# compile error, a spill at a Glow shape, too much shared memory, or tables that differ from the committed ones
# in benchmarks/results/sm90-static/ (tables in build/sm90-static/; gpu-check-update rewrites the committed ones)
gpu-check: setup
	env -u TRITON_INTERPRET $(PY) -m benchmarks.gpu_check

gpu-check-update: setup
	env -u TRITON_INTERPRET $(PY) -m benchmarks.gpu_check --update

# only the tests that need a CUDA device (bfloat16 kernels, ...); `make test` on a GPU machine runs them too
test-gpu: setup
	FLOWKERN_REQUIRE_BACKENDS=$(REQUIRE_BACKENDS) $(PY) -m pytest -m gpu tests

# the libtorch build of csrc/ with CMake (from PyPI: it knows CUDA C++20), and its C++ test program
ctest: $(DEPS_STAMP)
	TORCH_CUDA_ARCH_LIST=$${TORCH_CUDA_ARCH_LIST:-9.0} $(VENV)/bin/cmake -S . -B $(CMAKE_BUILD) \
		$$($(PY) tools/cuda_toolkit.py --cmake-args) $(CMAKE_ARGS)
	$(VENV)/bin/cmake --build $(CMAKE_BUILD) -j 2
	$(VENV)/bin/ctest --test-dir $(CMAKE_BUILD) --output-on-failure

$(PEERS_STAMP): $(STAMP) Makefile
	$(PY) -m pip install --quiet $(PEERS)
	touch $@

# the headline benchmarks (about 10 minutes on a 2-core CPU); bench-full: every case (about half an hour)
bench: $(PEERS_STAMP)
	$(PY) -m benchmarks.run $(BENCH_ARGS)
	$(PY) -m benchmarks.report

bench-full: $(PEERS_STAMP)
	$(PY) -m benchmarks.run --full $(BENCH_ARGS)
	$(PY) -m benchmarks.report

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache flowkern/_C*.so
