// Host-side shape and launch logic of the CUDA fused attention, as pure
// functions: no CUDA or torch headers, so tests/cpp/attention_launch_test.cpp
// checks them with a plain C++17 compiler on a machine without a GPU.
//
// Shapes: query (B, Hq, L, E), key (B, Hkv, S, E), value (B, Hkv, S, Ev).
// Kernels are compiled per head-dim bucket D (64, 128, 256); E and Ev are
// padded with zeros up to D in shared memory, so any E, Ev <= 256 runs.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define ATTN_HOST_DEVICE __host__ __device__
#else
#define ATTN_HOST_DEVICE
#endif

namespace attnkernels {
namespace cuda_attention {

constexpr int kMaxHeadDim = 256;
constexpr int kMaxBackwardHeadDim = 256;
constexpr int kThreads = 128;  // 4 warps per block, forward and backward
constexpr int kElementBytes = 2;  // bf16 / fp16
// Positions (L, S) are ints in the kernels, with room for a last partial tile.
constexpr int64_t kMaxSequence = 2147483647LL - 256;

ATTN_HOST_DEVICE inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
ATTN_HOST_DEVICE inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// The head dims the kernels read, padded to whole 16-byte rows of 8 elements
// (cp.async copies 16 bytes); the padding is zero-filled by the api.
inline int64_t padded_head_dim(int64_t dim) { return round_up(dim, 8); }

// The smallest compiled bucket holding both head dims, or 0 if none does.
inline int forward_head_dim_bucket(int64_t E, int64_t Ev) {
  const int64_t widest = E > Ev ? E : Ev;
  if (widest <= 64) return 64;
  if (widest <= 128) return 128;
  if (widest <= kMaxHeadDim) return 256;
  return 0;
}

inline int backward_head_dim_bucket(int64_t E, int64_t Ev) {
  const int bucket = forward_head_dim_bucket(E, Ev);
  return bucket <= kMaxBackwardHeadDim ? bucket : 0;
}

// Forward: a block owns block_m = 64 queries (4 warps x 16 rows) and streams
// block_n keys per step through double-buffered shared memory.
struct ForwardTile {
  int block_m, block_n;
};

constexpr ForwardTile forward_tile(int D) { return D <= 128 ? ForwardTile{64, 64} : ForwardTile{64, 32}; }

// Q tile + two (K, V) tiles.
constexpr int forward_smem_bytes(int D) {
  return (forward_tile(D).block_m * D + 2 * 2 * forward_tile(D).block_n * D) * kElementBytes;
}

// Backward: a block owns block_n = 64 keys (4 warps x 16 keys) and runs over
// the queries block_m at a time (Q and dO tiles double-buffered); dS^T of one
// step goes through shared memory for dQ = dS K.
struct BackwardTile {
  int block_m, block_n;
};

constexpr BackwardTile backward_tile(int D) { return D <= 64 ? BackwardTile{64, 64} : BackwardTile{32, 64}; }

// The backward keeps dK and dV of 16 keys x (at most 128 columns) per warp in
// registers: the 256 bucket runs in two passes of 128 columns each.
constexpr int backward_pass_dim(int D) { return D <= 128 ? D : 128; }
constexpr int backward_passes(int D) { return D / backward_pass_dim(D); }

// K, V tiles + two (Q, dO) tiles + the dS^T tile.
constexpr int backward_smem_bytes(int D) {
  return (2 * backward_tile(D).block_n * D + 2 * 2 * backward_tile(D).block_m * D +
          backward_tile(D).block_n * backward_tile(D).block_m) *
         kElementBytes;
}

// The occupancy each kernel is designed for (blocks per SM on an sm_80 / sm_90
// SM: 164 / 228 KiB of shared memory, 64K registers). The static test checks
// ptxas' register and shared-memory counts against these.
constexpr int forward_blocks_per_sm(int D) { return D <= 128 ? 2 : 1; }
constexpr int backward_blocks_per_sm(int D) { return D <= 128 ? 2 : 1; }
// Registers per thread that keep that occupancy: 65536 / (blocks * 128 threads), at most 255.
constexpr int register_budget(int blocks_per_sm) {
  return 65536 / (blocks_per_sm * kThreads) > 255 ? 255 : 65536 / (blocks_per_sm * kThreads);
}

struct LaunchGrid {
  int64_t x, y, z;
};

// CUDA limits grid y and z to 65535.
constexpr int64_t kMaxGridYZ = 65535;
inline bool grid_fits(const LaunchGrid& grid) {
  return grid.x >= 1 && grid.x <= 2147483647LL && grid.y >= 1 && grid.y <= kMaxGridYZ && grid.z >= 1 &&
         grid.z <= kMaxGridYZ;
}

// x: query blocks (launched longest-first under causal masking), y: query head, z: batch.
inline LaunchGrid forward_grid(int64_t batch, int64_t q_heads, int64_t L, int D) {
  return LaunchGrid{ceil_div(L, forward_tile(D).block_m), q_heads, batch};
}

// x: key blocks (one block loops over all of them in deterministic mode, so
// that dQ is accumulated in one fixed order), y: kv head, z: batch.
inline LaunchGrid backward_grid(int64_t batch, int64_t kv_heads, int64_t S, int D, bool deterministic) {
  return LaunchGrid{deterministic ? 1 : ceil_div(S, backward_tile(D).block_n), kv_heads, batch};
}

// Under top-left causal masking query i sees keys j <= i: a block of queries
// [row0, row0 + rows) needs keys below row0 + rows only.
ATTN_HOST_DEVICE inline int64_t causal_key_end(int64_t row0, int64_t rows, int64_t S) {
  return S < row0 + rows ? S : row0 + rows;
}

// ... and a block of keys starting at col0 is seen by query blocks from this one on.
ATTN_HOST_DEVICE inline int64_t causal_first_query_block(int64_t col0, int block_m) { return col0 / block_m; }

// Dropout: the CPU kernel's counter-based generator (csrc/cpu/attention_math.h,
// DropoutMask), restated for the device: keep decisions from splitmix64's
// finaliser of (seed, flat (B, Hq, L, S) index), regenerated in the backward.
ATTN_HOST_DEVICE inline uint64_t dropout_mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

inline uint64_t dropout_key(int64_t seed) { return dropout_mix(static_cast<uint64_t>(seed) ^ 0x6A09E667F3BCC909ull); }

// Drop when the 24-bit uniform is below this (llround(p * 2^24), as the CPU).
inline uint64_t dropout_threshold(double p) {
  const double scaled = p * 16777216.0;
  return static_cast<uint64_t>(scaled + 0.5);  // p >= 0: round half away from zero, as llround
}

ATTN_HOST_DEVICE inline bool dropout_keep(uint64_t key, uint64_t threshold, uint64_t element) {
  return (dropout_mix(key + element * 0x9E3779B97F4A7C15ull) >> 40) >= threshold;
}

// Everything the kernels read: data pointers, strides in elements (the last
// dimension of q, k, v is contiguous), sizes and options. E and Ev are the
// padded head dims (multiples of 8).
struct AttentionParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t q_stride_b = 0, q_stride_h = 0, q_stride_l = 0;
  int64_t k_stride_b = 0, k_stride_h = 0, k_stride_s = 0;
  int64_t v_stride_b = 0, v_stride_h = 0, v_stride_s = 0;

  // (B, Hq, L, S) read through its strides; nullptr when there is no mask.
  const void* mask = nullptr;
  bool mask_is_bool = false;
  int64_t mask_stride_b = 0, mask_stride_h = 0, mask_stride_l = 0, mask_stride_s = 0;

  int batch = 0, q_heads = 0, kv_heads = 0, group = 1;
  int L = 0, S = 0;  // < 2^31 - 256 (checked by the api): positions fit an int
  int E = 0, Ev = 0;
  float scale_log2 = 0;  // scale * log2(e): scores are kept in base 2
  bool causal = false;

  bool dropout = false;
  uint64_t dropout_key = 0, dropout_threshold = 0;
  float keep_scale = 1;

  // Forward outputs, contiguous: out (B, Hq, L, Ev), lse (B, Hq, L) float32.
  void* out = nullptr;
  float* lse = nullptr;

  // Backward: dO (B, Hq, L, Ev) contiguous, lse, delta (B, Hq, L); dq_accum
  // (B, Hq, L, E) float32 zeros; dk (B, Hkv, S, E), dv (B, Hkv, S, Ev);
  // grad_mask (B, Hq, L, S) float32 zeros or nullptr.
  const void* grad_out = nullptr;
  const float* lse_in = nullptr;
  const float* delta = nullptr;
  float* dq_accum = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  float* grad_mask = nullptr;
  float scale = 1;
};

}  // namespace cuda_attention
}  // namespace attnkernels
