#!/usr/bin/env bash
# The GPU check: on a bare GPU machine, in one call of at most 9.5 minutes, build (or take a carried _C),
# check that every CUDA op is registered, run every test that exercises CUDA or Triton-on-CUDA code,
# measure the fixed benchmark table against torch, and run compute-sanitizer (memcheck on every attnkernels
# kernel, racecheck on attention) on a small workload.
#
#   OUT=<dir> bash scripts/gpu_check.sh              # on the GPU machine ($OUT: where results go)
#   bash scripts/gpu_check.sh --dry-run              # CI on a CPU machine: each stage's Python on tiny inputs
#
# Stage budgets (seconds; a stage past its budget is stopped and the script goes on):
#   env 15, build 170 (about 5 when a carried gpu_build/attnkernels/_C.abi3.so loads), registry 20,
#   tests 120, bench 90, sanitizer 140 (memcheck its budget less 40, racecheck 30): at most 555 s with a build.
#   Time a stage leaves unused goes to the tests and the benchmark. Override one with e.g. BUDGET_TESTS=200.
# Results, written as they happen (a killed run still returns what it did), at most 8 files:
#   summary.txt (one line per stage at the end), env.txt, build.log, tests.log, sanitizer.log,
#   bench.log, bench.jsonl, bench.md.
# Exit status: 0 when every stage passed.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
DRY_RUN=0
[ "${1:-}" = "--dry-run" ] && DRY_RUN=1
OUT=${OUT:-$ROOT/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
command -v "$PY" > /dev/null || PY=python
export PYTHONUNBUFFERED=1
# The checkout is not installed on the GPU machine: scripts/*.py import the package from here.
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export ATTNKERNELS_TRITON_ONE_CONFIG=1  # tests: the first config that fits, no autotuning (the bench unsets it)
SANITIZER=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")}
if [ "$DRY_RUN" = 1 ]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
fi
# Test dependencies the GPU image lacks (expecttest, for opcheck) travel as wheels in .whl/.
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

export PY OUT DRY_RUN SANITIZER
START=$(date +%s)
: > "$OUT/summary.txt"
RESULTS=()
failed=0
spare=0  # seconds earlier stages left unused, given to the tests and the benchmark

budget() {  # budget <NAME> <default seconds>
  local var="BUDGET_$1"
  echo "${!var:-$2}"
}

note() { echo "$(date -u +%H:%M:%S) +$(( $(date +%s) - START ))s $*" | tee -a "$OUT/summary.txt"; }

# stage <name> <budget seconds> <log file> <command...>: runs the command under `timeout`, appends
# its output to the log as it runs, and records one result line.
stage() {
  local name=$1 limit=$2 log=$3
  shift 3
  note "$name: start (budget ${limit} s)"
  local begin rc took status
  begin=$(date +%s)
  # A stage is a shell function: `timeout` runs it in a child bash (the functions are exported).
  timeout --signal=INT --kill-after=10 "$limit" bash -o pipefail -c '"$@"' stage "$@" >> "$OUT/$log" 2>&1
  rc=$?
  took=$(( $(date +%s) - begin ))
  if [ "$rc" -eq 0 ]; then status=ok
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status="TIMEOUT after ${limit} s"; failed=1
  else status="FAILED (exit $rc)"; failed=1
  fi
  spare=$(( spare + (limit > took ? limit - took : 0) ))
  RESULTS+=("$name: $status, ${took} s (budget ${limit} s), log $log")
  note "$name: $status in ${took} s"
  return "$rc"
}

# ----------------------------------------------------------------------------- env
env_report() {
  nvidia-smi || echo "no nvidia-smi"
  $PY - <<'EOF'
import sys, torch
print(sys.version)
print("torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton: not installed")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0),
          "SMs", p.multi_processor_count, "memory GiB", round(p.total_memory / 2**30, 1))
EOF
  "$CUDA_HOME/bin/nvcc" --version 2>/dev/null | tail -2 || echo "no nvcc at $CUDA_HOME"
  command -v ninja > /dev/null && echo "ninja $(ninja --version)" || echo "MISSING ninja: the build runs serially"
  for module in pytest hypothesis expecttest pytest_timeout; do
    $PY -c "import $module" 2>/dev/null && echo "have $module" || echo "MISSING $module (carry its wheel in .whl/)"
  done
  [ -x "$SANITIZER" ] && echo "compute-sanitizer: $SANITIZER" || echo "MISSING compute-sanitizer"
}
export -f env_report
stage env "$(budget ENV 15)" env.txt env_report
grep MISSING "$OUT/env.txt" | tee -a "$OUT/summary.txt"

# ----------------------------------------------------------------------------- build
build() {
  local carried=gpu_build/attnkernels/_C.abi3.so
  if [ "$DRY_RUN" = 1 ]; then
    echo "dry run: using the extension built in this checkout"
    $PY -c "import attnkernels._extension as e; print('extension loaded:', e.has_extension())"
    return
  fi
  if [ -f "$carried" ]; then
    cp "$carried" attnkernels/_C.abi3.so
    if $PY -c "import attnkernels._extension as e; assert e.has_cuda_kernels(), e.LOAD_ERROR" 2>&1; then
      echo "using the carried $carried (built for this torch, see scripts/build_for_gpu.sh)"
      return
    fi
    echo "the carried $carried does not load here: building"
    rm -f attnkernels/_C.abi3.so
  fi
  command -v ninja > /dev/null || echo "WARNING: ninja is missing; torch builds the sources one at a time"
  local arch
  arch=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")
  local begin=$(date +%s)
  FORCE_CUDA=1 ATTNKERNELS_PORTABLE=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=${MAX_JOBS:-$(nproc)} \
    $PY setup.py build_ext --inplace || return 1
  echo "built for sm_${arch/./} in $(( $(date +%s) - begin )) s with $(nproc) cores"
}
export -f build
stage build "$(budget BUILD 170)" build.log build

# ----------------------------------------------------------------------------- registry
registry() {
  $PY - <<'EOF'
import torch
import attnkernels
from attnkernels import _extension

expected = {"grid_sample", "grid_sample_backward", "affine_grid", "affine_grid_backward", "affine_grid_sample",
            "affine_grid_sample_backward", "attention", "attention_backward"}
print("backends:", attnkernels.available_backends())
print("CPU kernels:", sorted(_extension.CPU_OPS))
print("CUDA kernels:", sorted(_extension.CUDA_OPS))
missing_cpu = expected - _extension.CPU_OPS
assert not missing_cpu, f"ops without a CPU kernel: {sorted(missing_cpu)}"
if _extension.has_cuda_kernels():
    assert expected <= _extension.CUDA_OPS, f"ops without a CUDA kernel: {sorted(expected - _extension.CUDA_OPS)}"
elif torch.cuda.is_available():
    raise SystemExit("the extension has no CUDA kernels on a GPU machine")
EOF
}
export -f registry
stage registry "$(budget REGISTRY 20)" build.log registry

# ----------------------------------------------------------------------------- tests
run_tests() {
  local timeout_flag=()
  $PY -c "import pytest_timeout" 2>/dev/null && timeout_flag=(--timeout=90)
  if [ "$DRY_RUN" = 1 ]; then
    # No GPU: collect the cuda-marked tests (they import and are selected), run the Triton attention
    # tests the GPU run also runs, here under the interpreter.
    $PY -m pytest -q -m cuda --collect-only tests -p no:cacheprovider | tail -n 3 || return 1
    $PY -m pytest -q -p no:cacheprovider tests/test_triton_attention.py -k "exact_dtype and L17" \
      --durations=5 "${timeout_flag[@]}" || return 1
    # The CUDA attention tests' own logic, on the CPU backend (it checks the tests, not the kernels).
    ATTNKERNELS_CUDA_ATTENTION_DRY_RUN=1 $PY -m pytest -q -p no:cacheprovider tests/test_cuda_attention.py -x \
      --durations=5
    return
  fi
  # Every cuda-marked test, and the triton-marked tests (they run on CUDA tensors when not interpreting).
  # Triton compiles each specialisation on the CPU: pytest-xdist spreads that over the cores.
  local parallel=()
  $PY -c "import xdist" 2>/dev/null && parallel=(-n "${TEST_WORKERS:-8}")
  $PY -m pytest -v -p no:cacheprovider -m "cuda or triton" tests --durations=40 --maxfail=25 \
    "${parallel[@]}" "${timeout_flag[@]}" 2>&1
}
export -f run_tests
tests_budget=$(( $(budget TESTS 120) + spare / 2 ))
spare=$(( spare - spare / 2 ))
stage tests "$tests_budget" tests.log run_tests

# ----------------------------------------------------------------------------- bench
bench() {
  unset ATTNKERNELS_TRITON_ONE_CONFIG  # the benchmark autotunes for real
  export TRITON_PRINT_AUTOTUNING=1  # the log names each kernel's winning config (to prune the config lists)
  if [ "$DRY_RUN" = 1 ]; then
    $PY -m attnkernels.bench.gpu_table --out "$OUT" --dry-run
  else
    $PY -m attnkernels.bench.gpu_table --out "$OUT"
  fi
}
export -f bench
stage bench "$(( $(budget BENCH 90) + spare ))" bench.log bench

# ----------------------------------------------------------------------------- sanitizer
sanitize() {
  if [ "$DRY_RUN" = 1 ]; then
    $PY scripts/gpu_workload.py --device cpu
    return
  fi
  [ -x "$SANITIZER" ] || { echo "no compute-sanitizer"; return 1; }
  local rc=0 only_ours=()
  # The workload checks each result against the reference backend, which runs many torch kernels:
  # instrumenting only attnkernels' own (every one is in that namespace) keeps memcheck inside its time.
  "$SANITIZER" --help 2>&1 | grep -q -- "--kernel-name " && only_ours=(--kernel-name kns=attnkernels)
  echo "== memcheck: the workload's kernels ${only_ours[*]}"
  timeout "$(( SANITIZER_SECONDS - 40 ))" "$SANITIZER" --tool memcheck --error-exitcode 3 --print-limit 20 "${only_ours[@]}" \
    $PY scripts/gpu_workload.py || { local status=$?; rc=1; echo "memcheck: exit status $status (124: out of time)"; }
  echo "== racecheck: the kernels with shared memory (the CUDA attention, scripts/sanitize_attention.py quick)"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 30 "$SANITIZER" --tool racecheck --error-exitcode 3 --print-limit 20 \
    $PY scripts/sanitize_attention.py quick || rc=1
  return $rc
}
export -f sanitize
SANITIZER_SECONDS=$(budget SANITIZER 140)
export SANITIZER_SECONDS
stage sanitizer "$SANITIZER_SECONDS" sanitizer.log sanitize

{
  echo "== summary ($(( $(date +%s) - START )) s in all$([ "$DRY_RUN" = 1 ] && echo ', dry run'))"
  printf '%s\n' "${RESULTS[@]}"
} | tee -a "$OUT/summary.txt"
exit $failed
