// Unit test of csrc/cpu/transpose_tiles.h (the register transposes around the CPU sampling loops)
// against plain loops, for every block shape up to the tile side, 1 to 3 summed sources (at unequal
// distances from each other, as the private gradient spans are), and
// larger matrices with strides wider than the block. Built by tests/test_sampling_layout.py with
// each CPU variant's flags; prints "skip" and exits 0 on a CPU without the variant's instructions.
#include <cstdio>
#include <cstdint>
#include <random>
#include <vector>

#include "cpu/transpose_tiles.h"

namespace layout = attnkernels::cpu::ATTNKERNELS_CPU_ISA;

namespace {

int failures = 0;

// Transposes a rows x cols matrix (summing `copies` sources, through transpose_sum, or the one
// source through transpose) and compares every element of the destination, including the guard
// values around the block, which must stay untouched.
void check(int64_t rows, int64_t cols, int64_t copies, std::mt19937& rng) {
  const int64_t src_stride = cols + 3, dst_stride = rows + 5;
  std::uniform_real_distribution<float> value(-4.0f, 4.0f);
  std::vector<int64_t> start(copies);
  int64_t size = 0;
  for (int64_t c = 0; c < copies; ++c) {
    start[c] = size;
    size += rows * src_stride + 7 + 13 * c;  // the sources are not evenly spaced
  }
  std::vector<float> src(size + 16);
  for (float& v : src) v = value(rng);
  std::vector<const float*> sources(copies);
  for (int64_t c = 0; c < copies; ++c) sources[c] = src.data() + start[c];
  const float guard = -1234.5f;
  std::vector<float> dst((cols + 1) * dst_stride, guard);
  if (copies == 1) {
    layout::transpose(src.data(), src_stride, rows, cols, dst.data(), dst_stride);
  } else {
    layout::transpose_sum(sources.data(), copies, src_stride, rows, cols, dst.data(), dst_stride);
  }
  for (int64_t j = 0; j < cols + 1; ++j) {
    for (int64_t i = 0; i < dst_stride; ++i) {
      float want = guard;
      if (j < cols && i < rows) {
        want = sources[0][i * src_stride + j];
        for (int64_t c = 1; c < copies; ++c) want += sources[c][i * src_stride + j];
      }
      if (dst[j * dst_stride + i] != want) {
        if (failures++ < 10) {
          std::printf("rows %lld cols %lld copies %lld: dst[%lld][%lld] = %g, want %g\n", (long long)rows,
                      (long long)cols, (long long)copies, (long long)j, (long long)i, dst[j * dst_stride + i], want);
        }
      }
    }
  }
}

}  // namespace

int main() {
#if defined(ATTNKERNELS_CPU_AVX512)
  if (!__builtin_cpu_supports("avx512f")) {
    std::printf("skip: no AVX-512 on this CPU\n");
    return 0;
  }
#elif defined(ATTNKERNELS_CPU_AVX2)
  if (!__builtin_cpu_supports("avx2")) {
    std::printf("skip: no AVX2 on this CPU\n");
    return 0;
  }
#endif
  std::mt19937 rng(7);
  for (int64_t copies = 1; copies <= 3; ++copies) {
    for (int64_t rows = 1; rows <= 17; ++rows) {
      for (int64_t cols = 1; cols <= 17; ++cols) check(rows, cols, copies, rng);
    }
  }
  check(37, 50, 2, rng);
  check(64, 16, 1, rng);
  if (failures != 0) {
    std::printf("FAILED: %d wrong elements (tile side %lld)\n", failures, (long long)layout::kTransposeTile);
    return 1;
  }
  std::printf("ok (tile side %lld)\n", (long long)layout::kTransposeTile);
  return 0;
}
