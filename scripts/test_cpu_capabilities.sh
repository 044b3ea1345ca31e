#!/usr/bin/env bash
# Runs the CPU-kernel tests under every CPU variant of the kernels that this machine can run (default, avx2,
# avx512: see csrc/cpu/cpu_dispatch.cpp), each forced with ATTNKERNELS_CPU_CAPABILITY. Extra arguments go to pytest.
# The best capability is not repeated here: the plain `pytest` run uses it. avx512_bf16 (the avx512 variant with
# bfloat16 attention on AVX512-BF16) runs here only where avx512_amx (bfloat16 attention on AMX tiles) is the best.
set -euo pipefail
cd "$(dirname "$0")/.."

# Only the C++ CPU kernels differ between variants: select the cpu-cpu (device-backend) cases and leave out
# the Triton interpreter, the pure-PyTorch reference backend and CUDA, which the plain `pytest` run covers.
export TRITON_INTERPRET=0
best=$(env -u ATTNKERNELS_CPU_CAPABILITY python -c "import attnkernels; print(attnkernels.cpu_capability())")
tests=(tests/test_cpu_capability.py tests/test_grid_sample.py tests/test_affine.py tests/test_attention.py
       tests/test_attention_devices.py tests/test_attention_errors.py tests/test_attention_few_queries.py
       tests/test_sampling_errors.py
       tests/test_sampling_library.py)
variants=(default avx2 avx512)
if [ "$best" = avx512_amx ]; then variants+=(avx512_bf16); fi
for capability in "${variants[@]}"; do
  echo "== CPU kernels, ${capability} variant"
  ATTNKERNELS_CPU_CAPABILITY=$capability python -m pytest -q -p no:cacheprovider -k "not cpu-reference and not cpu-triton and not cuda-" "${tests[@]}" "$@"
  # An `if`, not `[ ] && break`: a false test as the loop's last command would be the script's exit status.
  if [ "$capability" = "$best" ]; then break; fi
done
