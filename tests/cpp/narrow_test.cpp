// Unit test of narrow_scaled (csrc/cpu/attention_tiles.h), the attention kernels' conversion of float32 rows
// to their output dtype: float16 through vcvtps2ph eight at a time must give the bits of c10's scalar
// conversion for every kind of value (rounding ties, float16 subnormals and underflow to 0, overflow to inf,
// signed zeros, inf, NaN), every scale, and lengths that leave a tail. Built by tests/test_dot_tiles.py with
// the avx2 variant's flags.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "cpu/attention_tiles.h"
#include "cpu_variant.h"

namespace tiles = attnkernels::cpu::ATTNKERNELS_CPU_ISA;

int main() {
  if (!cpu_runs_this_variant()) return 0;
  std::mt19937 rng(7);
  std::vector<float> values = {0.0f, -0.0f, 1.0f, -1.0f, 65504.0f, 65520.0f, 1e6f, -1e6f,
                               std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                               std::numeric_limits<float>::quiet_NaN(), 6.0e-8f, 3.0e-8f, 2.9e-8f, 1e-10f,
                               std::numeric_limits<float>::denorm_min()};
  // Ties: halfway between two float16 values at several exponents (float16 has 10 mantissa bits).
  for (int e = -24; e <= 15; ++e) {
    for (int m = 0; m < 4; ++m) values.push_back(std::ldexp(1.0f + (2 * m + 1) / 2048.0f, e));
  }
  std::uniform_real_distribution<float> unit(-1.0f, 1.0f);
  std::uniform_int_distribution<int> exponent(-30, 18);
  for (int i = 0; i < 4000; ++i) values.push_back(std::ldexp(unit(rng), exponent(rng)));
  int failures = 0;
  for (float scale : {1.0f, 0.5f, 1.0f / 3.0f, 3.0f, 1e-6f}) {
    for (size_t n : {values.size(), size_t(7), size_t(13)}) {
      std::vector<c10::Half> got(n);
      tiles::narrow_scaled(values.data(), scale, int64_t(n), got.data());
      for (size_t i = 0; i < n; ++i) {
        const c10::Half want = static_cast<c10::Half>(values[i] * scale);
        const bool both_nan = std::isnan(float(got[i])) && std::isnan(float(want));
        if (!both_nan && got[i].x != want.x) {
          if (++failures <= 5) std::printf("%g * %g: got bits %04x, want %04x\n", values[i], scale, got[i].x, want.x);
        }
      }
    }
  }
  if (failures != 0) {
    std::printf("%d conversions differ\n", failures);
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
