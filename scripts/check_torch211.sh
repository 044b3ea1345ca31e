#!/usr/bin/env bash
# The GPU machine's software on this CPU machine (CI's GPU-readiness stage): torch 2.11.0 and Triton
# 3.6.0 in their own venv (the oldest torch the README promises; CI's main stage tests the newest).
#   1. build the package against it with CUDA for sm_90 (scripts/build_for_gpu.sh; C++17 there),
#   2. import it and check that every op has its CPU and CUDA kernels registered,
#   3. compile every Triton kernel for sm_90 with Triton 3.6's own compiler, size-1 arguments included,
#   4. run the CPU tests of the ops (no GPU needed) against torch 2.11.
# Runs in a copy of the checkout, so the main stage's build (for the newer torch) stays in place.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${GPU_VENV:-$HOME/.venvs/torch211}
start=$(date +%s)
bash scripts/build_for_gpu.sh
PY="$VENV/bin/python"
"$PY" -m pip install -q pytest hypothesis expecttest numpy

copy=$(mktemp -d)/attnkernels-torch211
mkdir -p "$copy"
tar --exclude=./.git --exclude=./build --exclude=./gpu_build --exclude='*.so' -cf - . | tar -xf - -C "$copy"
cp gpu_build/attnkernels/_C.abi3.so "$copy/attnkernels/"
cd "$copy"

"$PY" - <<'PYEOF'
import torch
import attnkernels
from attnkernels import _extension

assert torch.__version__.startswith("2.11"), torch.__version__
assert _extension.has_extension(), _extension.LOAD_ERROR
expected = {"grid_sample", "grid_sample_backward", "affine_grid", "affine_grid_backward", "affine_grid_sample",
            "affine_grid_sample_backward", "attention", "attention_backward"}
assert expected <= _extension.CPU_OPS, sorted(expected - _extension.CPU_OPS)
assert expected <= _extension.CUDA_OPS, sorted(expected - _extension.CUDA_OPS)
print(f"torch {torch.__version__}: attnkernels loads; CPU kernels {sorted(_extension.CPU_OPS)}; "
      f"CUDA kernels {sorted(_extension.CUDA_OPS)}")
PYEOF

env -u TRITON_INTERPRET "$PY" -c "import triton; print('triton', triton.__version__)"
env -u TRITON_INTERPRET "$PY" -m attnkernels.triton._compile_check | tail -n 3

# The CPU tests of the ops, their registration, autograd, torch.compile and patching against torch 2.11
# (torch 2.11's wrap_triton does not take interpreted kernels: the Triton tests run in the main stage;
# the example, distributed, bench and CUDA-compile tests exercise no torch-version-specific op code;
# test_cpu_capability reads the library's symbols, which the carried build strips).
"$PY" -m pytest -q -p no:cacheprovider -m "not triton" -x tests --ignore=tests/test_triton_compile.py \
  --ignore=tests/test_cuda_attention_static.py --ignore=tests/test_example.py --ignore=tests/test_distributed.py \
  --ignore=tests/test_bench_command.py --ignore=tests/test_cpu_capability.py ${TORCH211_PYTEST_ARGS:-}
echo "torch 2.11 stage: $(( $(date +%s) - start )) s"
