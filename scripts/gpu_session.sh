#!/usr/bin/env bash
# One GPU session for attnkernels: build the CUDA kernels, run the whole test suite on the GPU, run
# compute-sanitizer (memcheck, racecheck) on small shapes, and run the GPU benchmarks.
#
#   scripts/gpu_session.sh [build] [test] [sanitize] [sanitize-attention] [bench] [bench-cli] [bench-attention]
#   (no argument: all of them)
#
# Every log and result goes under $OUT (default ./gpu_out): summary.txt, env.txt, build.log, tests.log,
# sanitizer.log, bench_sampling.md/.json, bench_cli.md. The stages can run in separate calls on the same
# machine (each stage fits a 10-minute limit; `build` first). Needs no network: pip runs without build
# isolation and without dependencies. Exit status: 0 when every stage run passed.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-$ROOT/gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
SANITIZER=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")}
# Test dependencies the GPU image may lack (expecttest, for opcheck) can travel as wheels in .whl/ (see the
# device notes): installed into /tmp/site without network.
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(build test sanitize sanitize-attention bench bench-cli bench-attention)
failed=0

note() { echo "$(date -u +%H:%M:%S) $*" | tee -a "$OUT/summary.txt"; }
finish() {  # finish <stage> <exit status>
  if [ "$2" -eq 0 ]; then note "$1: ok"; else note "$1: FAILED (exit $2)"; failed=1; fi
}

{
  nvidia-smi || true
  $PY -c "import sys, torch, triton; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda,
'triton', triton.__version__, torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))"
  "$CUDA_HOME/bin/nvcc" --version | tail -2
  for module in pytest hypothesis xdist pytest_timeout expecttest; do
    $PY -c "import $module" 2>/dev/null && echo "have $module" || echo "MISSING $module (carry its wheel in .whl/)"
  done
} > "$OUT/env.txt" 2>&1
grep MISSING "$OUT/env.txt" >> "$OUT/summary.txt"

for stage in "${STAGES[@]}"; do
  note "$stage: start"
  case "$stage" in
    build)
      # The card's own architecture only (the CI build compiles 8.0 and 9.0 on the CPU machine).
      arch=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")
      start=$(date +%s)
      FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=${MAX_JOBS:-16} \
        $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1
      rc=$?
      note "build: $(( $(date +%s) - start )) s for sm_${arch/./}"
      $PY -c "import attnkernels._extension as e; assert e.has_kernel('grid_sample', 'CUDA'), 'no CUDA kernels'" \
        >> "$OUT/build.log" 2>&1 || rc=1
      finish build $rc
      ;;
    test)
      # The whole suite: the cuda-marked tests run here, the others as in CI.
      extra=()
      $PY -c "import xdist" 2>/dev/null && extra+=(-n "${PYTEST_WORKERS:-8}")
      $PY -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout 900)
      $PY -m pytest tests -q -rfEs -p no:cacheprovider "${extra[@]}" > "$OUT/tests.log" 2>&1
      rc=$?
      tail -5 "$OUT/tests.log" >> "$OUT/summary.txt"
      finish test $rc
      ;;
    sanitize)
      script=$(mktemp --suffix .py)
      cat > "$script" <<'PYEOF'
# Every CUDA sampling kernel on small shapes: all modes, paddings, 2-D/3-D, both input layouts, lane-group
# widths (3 and 33 channels), atomic and deterministic backward, fused affine and affine_grid.
# With the argument "quick" (racecheck, which is slower): float32 and every mode with zeros padding only.
import sys
import torch
import attnkernels  # noqa: F401
ops = torch.ops.attnkernels
dev = "cuda"
quick = sys.argv[1:] == ["quick"]
for dtype in (torch.float32,) if quick else (torch.float32, torch.float16):
    for dims in (2, 3):
        fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
        spatial, out = ((3, 4, 5), (2, 3, 7)) if dims == 3 else ((5, 6), (7, 9))
        for channels in (3, 33):
            x = torch.randn((2, channels, *spatial), device=dev, dtype=dtype)
            g = (torch.rand((2, *out, dims), device=dev, dtype=dtype) * 2.4 - 1.2)
            theta = (torch.eye(dims, dims + 1, device=dev) + 0.3 * torch.randn(2, dims, dims + 1, device=dev))
            theta = theta.to(dtype)
            size = [2, channels, *out]
            for xv in (x, x.contiguous(memory_format=fmt)):
                for mode in range(3):
                    for padding in range(1 if quick else 3):
                        go = torch.randn((2, channels, *out), device=dev, dtype=dtype)
                        ops.grid_sample(xv, g, mode, padding, False)
                        ops.grid_sample_backward(go, xv, g, mode, padding, True, [True, True])
                        ops.grid_sample_backward(go, xv, g, mode, padding, False, [False, True])
                        ops.affine_grid_sample(xv, theta, size, mode, padding, False)
                        ops.affine_grid_sample_backward(go, xv, theta, size, mode, padding, True, [True, True])
                        torch.use_deterministic_algorithms(True)
                        ops.grid_sample_backward(go, xv, g, mode, padding, False, [True, True])
                        ops.affine_grid_sample_backward(go, xv, theta, size, mode, padding, False, [True, False])
                        torch.use_deterministic_algorithms(False)
            grid = ops.affine_grid(theta, size, False)
            ops.affine_grid_backward(torch.randn_like(grid), size, True)
torch.cuda.synchronize()
print("sanitizer workload done")
PYEOF
      rc=0
      for tool in memcheck racecheck; do
        echo "=== $tool" >> "$OUT/sanitizer.log"
        workload=full
        [ "$tool" = racecheck ] && workload=quick
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 280 "$SANITIZER" --tool "$tool" --error-exitcode 9 \
          $PY "$script" "$workload" >> "$OUT/sanitizer.log" 2>&1 || rc=$?
        grep -E "ERROR SUMMARY|RACECHECK SUMMARY|workload done" "$OUT/sanitizer.log" | tail -2 >> "$OUT/summary.txt"
      done
      rm -f "$script"
      finish sanitize $rc
      ;;
    sanitize-attention)
      # The CUDA attention kernels on small shapes (scripts/sanitize_attention.py).
      rc=0
      for tool in memcheck racecheck; do
        echo "=== attention $tool" >> "$OUT/sanitizer_attention.log"
        workload=full
        [ "$tool" = racecheck ] && workload=quick
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 280 "$SANITIZER" --tool "$tool" --error-exitcode 9 \
          $PY scripts/sanitize_attention.py "$workload" >> "$OUT/sanitizer_attention.log" 2>&1 || rc=$?
        grep -E "ERROR SUMMARY|RACECHECK SUMMARY|workload done" "$OUT/sanitizer_attention.log" | tail -2 \
          >> "$OUT/summary.txt"
      done
      finish sanitize-attention $rc
      ;;
    bench-attention)
      # The CUDA attention against torch's default SDPA and the triton backend, then against torch's
      # cuDNN backend: bf16 and fp16, head dims 64 and 128, L = 1k..16k, causal and not, fwd and fwd+bwd.
      rc=0
      timeout 290 $PY -m attnkernels.bench --device cuda --op sdpa_hdim64,sdpa_hdim128 --backend cuda,triton \
        --dtype bfloat16,float16 --no-progress --out "$OUT/bench_attention" \
        --results-md "$OUT/bench_attention.md" > /dev/null 2>> "$OUT/summary.txt" || rc=$?
      timeout 290 $PY -m attnkernels.bench --device cuda --op sdpa_cudnn_hdim64,sdpa_cudnn_hdim128 --backend cuda \
        --dtype bfloat16,float16 --no-progress --out "$OUT/bench_attention_cudnn" \
        --results-md "$OUT/bench_attention_cudnn.md" > /dev/null 2>> "$OUT/summary.txt" || rc=$?
      finish bench-attention $rc
      ;;
    bench)
      $PY bench/gpu_sampling.py --markdown "$OUT/bench_sampling.md" --json "$OUT/bench_sampling.json" \
        > /dev/null 2>> "$OUT/summary.txt"
      finish bench $?
      ;;
    bench-cli)
      # The project's general benchmark command, sampling ops, on this card.
      timeout 500 $PY -m attnkernels.bench --device cuda --op grid_sample,affine_grid_sample --no-progress \
        --results-md "$OUT/bench_cli.md" > /dev/null 2>> "$OUT/summary.txt"
      finish bench-cli $?
      ;;
    *)
      note "unknown stage $stage (build, test, sanitize, sanitize-attention, bench, bench-cli, bench-attention)"
      failed=1
      ;;
  esac
done
exit $failed
