// Whether this CPU runs the CPU variant a unit test was built for (with the flags tests/cpp_unit.py gives
// each variant). When it does not, prints "skip: ..." (the Python side then skips the test): main returns 0.
#pragma once

#include <cstdio>

inline bool cpu_runs_this_variant() {
  __builtin_cpu_init();
#if defined(ATTNKERNELS_CPU_AVX512)
  if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw") ||
      !__builtin_cpu_supports("avx512vl") || !__builtin_cpu_supports("avx512dq")) {
    std::printf("skip: this CPU has no AVX-512\n");
    return false;
  }
#else
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma") || !__builtin_cpu_supports("f16c")) {
    std::printf("skip: this CPU has no AVX2 + FMA + F16C\n");
    return false;
  }
#endif
  return true;
}
