// Unit test of the CPU kernels' scratch memory (csrc/cpu/scratch_memory.h): every ScratchBuffer and
// AlignedVector starts on a 64-byte cache line, whatever its element type and length, on the main thread
// and on another thread (whose allocations come from another malloc arena), between allocations of odd
// sizes that leave malloc's own 16-byte-aligned blocks at every offset. Built by tests/test_dot_tiles.py.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <thread>
#include <vector>

#include <c10/util/BFloat16.h>

#include "cpu/scratch_memory.h"
#include "cpu_variant.h"

namespace tiles = attnkernels::cpu::ATTNKERNELS_CPU_ISA;

namespace {

bool on_cache_line(const void* p) { return reinterpret_cast<uintptr_t>(p) % 64 == 0; }

template <typename T>
int misaligned_buffers() {
  int failures = 0;
  std::vector<std::unique_ptr<char[]>> odd_blocks;
  std::vector<tiles::ScratchBuffer<T>> buffers;
  std::vector<tiles::AlignedVector<T>> vectors;
  for (int64_t n = 1; n <= 300; n += 7) {
    odd_blocks.emplace_back(new char[static_cast<size_t>(n % 48 + 1)]);
    buffers.emplace_back(n);
    vectors.emplace_back(static_cast<size_t>(n));
    vectors.back().resize(static_cast<size_t>(3 * n + 1));  // a reallocation keeps the alignment
    if (!on_cache_line(buffers.back().data())) ++failures;
    if (!on_cache_line(vectors.back().data())) ++failures;
    for (const T& x : vectors.back()) failures += !(x == T(0));  // the vector's elements are zeroed
  }
  return failures;
}

int misaligned_all_types() {
  return misaligned_buffers<float>() + misaligned_buffers<double>() + misaligned_buffers<c10::BFloat16>() +
         misaligned_buffers<uint32_t>();
}

}  // namespace

int main() {
  if (!cpu_runs_this_variant()) return 0;
  int failures = misaligned_all_types();
  int thread_failures = 0;
  std::thread other([&] { thread_failures = misaligned_all_types(); });
  other.join();
  failures += thread_failures;
  if (failures != 0) {
    std::printf("%d scratch buffers or elements were wrong\n", failures);
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
