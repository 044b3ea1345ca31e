// CPU unit test of the CUDA attention's host-side launch logic
// (csrc/cuda/attention_launch.h), built and run by tests/test_cuda_attention_static.py.
// It also checks that the dropout generator restated for the GPU makes exactly
// the CPU kernel's decisions (csrc/cpu/attention_math.h). Exit status 0 = pass.
#include <cstdio>
#include <cstdlib>

#include "cpu/attention_math.h"
#include "cuda/attention_launch.h"

using namespace attnkernels::cuda_attention;

static int failures = 0;

#define EXPECT(condition)                                                     \
  do {                                                                        \
    if (!(condition)) {                                                       \
      std::printf("FAILED line %d: %s\n", __LINE__, #condition);              \
      ++failures;                                                             \
    }                                                                         \
  } while (0)

static void test_head_dim_buckets() {
  EXPECT(padded_head_dim(1) == 8 && padded_head_dim(8) == 8 && padded_head_dim(9) == 16 && padded_head_dim(257) == 264);
  EXPECT(forward_head_dim_bucket(64, 64) == 64 && forward_head_dim_bucket(8, 16) == 64);
  EXPECT(forward_head_dim_bucket(65, 8) == 128 && forward_head_dim_bucket(8, 128) == 128);
  EXPECT(forward_head_dim_bucket(129, 8) == 256 && forward_head_dim_bucket(256, 256) == 256);
  EXPECT(forward_head_dim_bucket(257, 8) == 0 && forward_head_dim_bucket(8, 264) == 0);
  EXPECT(backward_head_dim_bucket(128, 128) == 128 && backward_head_dim_bucket(40, 72) == 128);
  EXPECT(backward_head_dim_bucket(136, 8) == 256 && backward_head_dim_bucket(64, 64) == 64);
  EXPECT(backward_head_dim_bucket(8, 257) == 0);
  // The backward's register-resident dK, dV hold at most 128 columns: two passes at 256.
  EXPECT(backward_pass_dim(64) == 64 && backward_passes(64) == 1 && backward_passes(128) == 1);
  EXPECT(backward_pass_dim(256) == 128 && backward_passes(256) == 2);
}

// Shared memory per block, times the blocks per SM designed for, fits an SM
// (sm_80: 164 KiB, 163 KiB per block; sm_90: 228 KiB, 227 KiB per block; 1 KiB reserved per block).
static void test_shared_memory_and_occupancy() {
  for (int D : {64, 128, 256}) {
    const int bytes = forward_smem_bytes(D);
    EXPECT(bytes <= 163 * 1024);
    EXPECT(forward_blocks_per_sm(D) * (bytes + 1024) <= 228 * 1024);
    if (D <= 128) EXPECT(forward_blocks_per_sm(D) * (bytes + 1024) <= 164 * 1024);
  }
  for (int D : {64, 128, 256}) {
    const int bytes = backward_smem_bytes(D);
    EXPECT(bytes <= 163 * 1024);
    EXPECT(backward_blocks_per_sm(D) * (bytes + 1024) <= 164 * 1024);
  }
  EXPECT(forward_smem_bytes(128) == (64 * 128 + 4 * 64 * 128) * 2);
  EXPECT(backward_smem_bytes(128) == (2 * 64 * 128 + 4 * 32 * 128 + 64 * 32) * 2);
  EXPECT(register_budget(2) == 255 && register_budget(4) == 128);
}

static void test_grids() {
  LaunchGrid g = forward_grid(2, 3, 130, 64);
  EXPECT(g.x == 3 && g.y == 3 && g.z == 2 && grid_fits(g));
  g = forward_grid(1, 1, 1, 256);
  EXPECT(g.x == 1 && grid_fits(g));
  g = backward_grid(2, 5, 130, 128, false);
  EXPECT(g.x == 3 && g.y == 5 && g.z == 2);
  g = backward_grid(2, 5, 130, 128, true);
  EXPECT(g.x == 1);
  EXPECT(!grid_fits(forward_grid(1, 65536, 10, 64)) && !grid_fits(forward_grid(65536, 1, 10, 64)));
  EXPECT(grid_fits(forward_grid(65535, 65535, 10, 64)));
}

// Causal tiling: the key range of a query block covers every key its rows see,
// and the query blocks a key block starts from cover every query that sees it.
static void test_causal_ranges() {
  const int lengths[] = {1, 2, 15, 16, 17, 63, 64, 65, 100, 127, 128, 129, 333};
  for (int L : lengths) {
    for (int S : lengths) {
      for (int D : {64, 128, 256}) {
        const int block_m = forward_tile(D).block_m;
        for (int row0 = 0; row0 < L; row0 += block_m) {
          const int64_t end = causal_key_end(row0, block_m, S);
          const int last_row = row0 + block_m - 1 < L - 1 ? row0 + block_m - 1 : L - 1;
          const int last_seen = last_row < S - 1 ? last_row : S - 1;  // the block's rows see keys <= last_seen
          EXPECT(end >= last_seen + 1 && end <= S);
        }
      }
      for (int D : {64, 128, 256}) {
        const int block_m = backward_tile(D).block_m, block_n = backward_tile(D).block_n;
        for (int col0 = 0; col0 < S; col0 += block_n) {
          const int64_t first = causal_first_query_block(col0, block_m);
          EXPECT(first * block_m <= col0);  // query col0 (the first that sees key col0) is not skipped
          EXPECT(first * block_m + block_m > col0);  // and only blocks that see none are skipped
        }
      }
    }
  }
}

static void test_dropout_matches_the_cpu_generator() {
  const long long seeds[] = {0, 1, 12345, -7, 4611686018427387903LL};
  const double ps[] = {0.0, 0.1, 0.5, 0.9, 0.999};
  for (long long seed : seeds) {
    for (double p : ps) {
      const attnkernels::cpu::DropoutMask cpu(seed, p);
      EXPECT(dropout_key(seed) == cpu.key);
      EXPECT(dropout_threshold(p) == cpu.threshold);
      for (uint64_t element = 0; element < 4096; element += 1) {
        EXPECT(dropout_keep(dropout_key(seed), dropout_threshold(p), element * 977 + 3) ==
               cpu.keep(element * 977 + 3));
      }
    }
  }
}

int main() {
  test_head_dim_buckets();
  test_shared_memory_and_occupancy();
  test_grids();
  test_causal_ranges();
  test_dropout_matches_the_cpu_generator();
  if (failures == 0) std::printf("attention_launch_test: all checks passed\n");
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
