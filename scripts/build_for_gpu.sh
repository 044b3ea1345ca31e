#!/usr/bin/env bash
# Build, on this CPU machine, the attnkernels._C that the GPU machine loads, so a GPU check can skip
# its build: against that machine's torch (2.11.0, Triton 3.6.0), CUDA for sm_90, portable CPU code,
# the stable Python ABI (abi3: one file for Python 3.10 and newer, so it loads under the GPU machine's
# Python 3.12). Writes gpu_build/attnkernels/_C.abi3.so, which scripts/gpu_check.sh takes when it loads.
#
#   bash scripts/build_for_gpu.sh            # venv in $GPU_VENV (default ~/.venvs/torch211), made if missing
#   then: device run with carry ["gpu_build"] and `bash scripts/gpu_check.sh`
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${GPU_VENV:-$HOME/.venvs/torch211}
TORCH_VERSION=${GPU_TORCH:-2.11.0}
TRITON_VERSION=${GPU_TRITON:-3.6.0}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null
then
  "$VENV/bin/pip" install -q "torch==$TORCH_VERSION" "triton==$TRITON_VERSION" ninja "setuptools>=64" wheel
fi
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
start=$(date +%s)
rm -rf gpu_build
# Compressed device code and no host symbols: the file travels to the GPU machine with the working
# tree, 64 MiB at most in all (uncompressed and unstripped it is about 83 MB).
FORCE_CUDA=1 ATTNKERNELS_PORTABLE=1 TORCH_CUDA_ARCH_LIST="9.0" MAX_JOBS=${MAX_JOBS:-2} \
  ATTNKERNELS_NVCC_FLAGS="--compress-mode=size" \
  "$VENV/bin/python" setup.py -q build_ext --build-lib gpu_build --build-temp "${TMPDIR:-/tmp}/attnkernels_gpu_build"
strip --strip-unneeded gpu_build/attnkernels/_C.abi3.so
ls -la gpu_build/attnkernels/_C.abi3.so
echo "built gpu_build/attnkernels/_C.abi3.so against torch $TORCH_VERSION in $(( $(date +%s) - start )) s"
