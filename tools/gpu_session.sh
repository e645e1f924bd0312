#!/usr/bin/env bash
# The GPU checks, as one call on a lent GPU machine (its python3 holds torch, triton and nvcc; nothing is
# installed): build the CUDA extension for sm_90 there, time each op the static model describes beside its
# estimate (benchmarks/gpu_validate.py), time a Glow training step eager and replayed as one CUDA graph
# (benchmarks/gpu_step.py), run the fused backends' tests on the GPU, and compute-sanitizer's
# memcheck over the CUDA kernels' tests. Each step is time-boxed so the whole fits one 10-minute call; logs
# and results go to $OUT, and summary.txt, printed last, has one line per step.
#
#     bash tools/gpu_session.sh            # OUT defaults to /tmp/flowkern-gpu
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/flowkern-gpu}
mkdir -p "$OUT"
: > "$OUT/summary.txt"
export PYTHONUNBUFFERED=1 FLOWKERN_REQUIRE_BACKENDS=triton,native
PY=${PYTHON:-python3}

# step NAME SECONDS COMMAND...: runs COMMAND with its output in $OUT/NAME.log, and records its exit status
step() {
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "$name: exit $rc after $((SECONDS - start)) s; $(tail -n 1 "$OUT/$name.log")" >> "$OUT/summary.txt"
  return $rc
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  "$PY" -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__,
torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')"
} > "$OUT/device.log" 2>&1

# most important first: each step is cut at its limit (exit 124), and the whole stays under 600 s
if step build 240 env FLOWKERN_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="$(nproc)" \
    "$PY" setup.py build_ext --inplace; then
  step validate 90 "$PY" -m benchmarks.gpu_validate --out "$OUT"
  # the CIFAR Glow's training step eager and replayed as one CUDA graph, against the plain-PyTorch Glow
  step step-graph 90 "$PY" -m benchmarks.gpu_step --out "$OUT"
  # the fused backends' tests run on the GPU where there is one (tests/fused_backends.py DEVICE)
  step gpu-tests 110 "$PY" -m pytest tests/test_kernels.py tests/test_autocast.py -q -x
  step memcheck 60 compute-sanitizer --tool memcheck --error-exitcode 3 \
    "$PY" -m pytest tests/test_kernels.py -q -x -k "native and (coupling or actnorm or conv1x1)"
fi
cat "$OUT/device.log" "$OUT/summary.txt"
