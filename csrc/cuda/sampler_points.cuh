// Per-point device code of the CUDA grid_sample and fused affine_grid_sample
// kernels (sampler_kernels.cuh): launch constants, the input view, a point's
// taps, warp and block sums, and the coordinate sources.
//
// Layouts. Input: any strides (N, C, [D,] H, W). Output and grad_output:
// contiguous (N, C, P) with P the flattened output positions. The input
// gradient is accumulated in a channels-last buffer (N, in_points, C) of the
// accumulation type, so that a warp's 32 lanes (= 32 channels) add to 32
// consecutive addresses.
//
// Indexing. Offsets within one batch item use `index_t` (int32_t when every
// per-item extent fits, else int64_t); the batch offset is always 64-bit.
//
// Coordinate sources (`Source`) say where a point's sampling coordinates come
// from and where their gradient goes:
//   GridSource   a stored grid (N, P, Dims); its gradient is written per point.
//   AffineSource theta (N, Dims, Dims + 1) times the base grid, computed on the
//                fly; its gradient is reduced per block (in double) and written
//                as one partial sum per tile, summed on the host side in a
//                fixed order (deterministic, no atomics).
#pragma once

#include <cstdint>

#include "../sampler_shape.h"

namespace attnkernels {
namespace cuda {

constexpr int kWarpSize = 32;
// Sampling kernels: 4 warps of 32 points each per tile.
constexpr int kSamplerWarps = 4;
constexpr int kPointsPerWarp = 32;
constexpr int kSamplerThreads = kSamplerWarps * kWarpSize;
constexpr int kPointsPerSamplerTile = kSamplerWarps * kPointsPerWarp;
// Point-per-thread kernels (forward on channel-planar input, affine_grid).
constexpr int kPointwiseThreads = 256;
constexpr int kMaxWarpsPerBlock = kPointwiseThreads / kWarpSize;

// The input as strides; `data` points at batch item 0, channel 0.
template <typename scalar_t, typename index_t>
struct InputView {
  const scalar_t* data;
  int64_t stride_batch;
  index_t stride_channel;
  index_t stride[3];  // per axis x, y, z
};

// The taps of one point: the tensor product of its axes' taps, evaluated
// lazily per tap so that 64-tap tricubic points do not need 64 registers of
// offsets and weights. Tap t has axis-a digit (t / K^a) % K, as on the CPU.
template <typename acc_t, int Dims, Interpolation mode, NanPolicy policy>
struct PointTaps {
  static constexpr int K = sampling::TapsPerAxis<mode>::value;
  static constexpr int kCount = int_pow(K, Dims);
  sampling::AxisTaps<acc_t, K> axis[Dims];

  __device__ __forceinline__ void build(const acc_t (&xyz)[Dims], const SamplerShape& g) {
#pragma unroll
    for (int a = 0; a < Dims; ++a) {
      axis[a] = sampling::axis_taps<mode, policy>(xyz[a], g.in_size[a], g.padding, g.align_corners);
    }
  }
  // A shift and a mask (K is 1, 2 or 4), which nvcc folds once the tap loop is unrolled. It does
  // not fold a division by int_pow(K, a) in the 3-D kernels: the taps then sit in local memory and
  // every channel re-reads them (tests/test_cuda_sampling_static.py).
  static_assert(K == 1 || K == 2 || K == 4, "taps per axis: a power of two up to 4");
  static constexpr int kDigitBits = K == 4 ? 2 : K == 2 ? 1 : 0;
  __device__ __forceinline__ static int digit(int t, int a) { return (t >> (a * kDigitBits)) & (K - 1); }

  template <typename index_t>
  __device__ __forceinline__ index_t offset(int t, const index_t (&stride)[3]) const {
    index_t off = 0;
#pragma unroll
    for (int a = 0; a < Dims; ++a) off += static_cast<index_t>(axis[a].index[digit(t, a)]) * stride[a];
    return off;
  }
  __device__ __forceinline__ acc_t weight(int t) const {
    acc_t w = acc_t(1);
#pragma unroll
    for (int a = 0; a < Dims; ++a) w *= axis[a].weight[digit(t, a)];
    return w;
  }
  __device__ __forceinline__ bool valid(int t) const {
    bool ok = true;
#pragma unroll
    for (int a = 0; a < Dims; ++a) ok = ok && axis[a].valid[digit(t, a)];
    return ok;
  }
  // d weight(t) / d normalised coordinate of axis `a`.
  __device__ __forceinline__ acc_t dweight(int t, int a) const {
    acc_t d = axis[a].dweight[digit(t, a)];
#pragma unroll
    for (int b = 0; b < Dims; ++b) {
      if (b != a) d *= axis[b].weight[digit(t, b)];
    }
    return d;
  }
};

// Sum of `value` over the `width` lanes of an aligned lane group (width a
// power of two); every lane of the warp must call it.
template <typename T>
__device__ __forceinline__ T group_sum(T value, int width) {
  for (int offset = width / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

// Adds each thread's `values[0..Q)` over the block and writes the block's sums
// to `out[0..Q)`. Every thread of the block must call it; blockDim.x is a
// multiple of 32 and at most kPointwiseThreads.
template <int Q>
__device__ __forceinline__ void block_sum_to(const double (&values)[Q], double* out) {
  __shared__ double warp_sums[kMaxWarpsPerBlock][Q];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int q = 0; q < Q; ++q) {
    double v = values[q];
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
    if (lane == 0) warp_sums[warp][q] = v;
  }
  __syncthreads();
  if (threadIdx.x < Q) {
    double total = 0.0;
    for (int w = 0; w < static_cast<int>(blockDim.x) / kWarpSize; ++w) total += warp_sums[w][threadIdx.x];
    out[threadIdx.x] = total;
  }
  __syncthreads();  // warp_sums is reused by the next tile
}

// ---------------------------------------------------------------- coordinate sources

// A stored grid, contiguous (N, P, Dims), and its gradient (same layout).
template <typename scalar_t, typename acc_t, int Dims>
struct GridSource {
  const scalar_t* grid;
  scalar_t* grad_grid;  // null when not needed
  int64_t points;

  __device__ __forceinline__ void load(int64_t n, int64_t p, acc_t (&xyz)[Dims]) const {
    const scalar_t* g = grid + (n * points + p) * Dims;
#pragma unroll
    for (int a = 0; a < Dims; ++a) xyz[a] = static_cast<acc_t>(g[a]);
  }
  __device__ __forceinline__ void store_grad(int64_t n, int64_t p, const acc_t (&grad)[Dims]) {
    scalar_t* g = grad_grid + (n * points + p) * Dims;
#pragma unroll
    for (int a = 0; a < Dims; ++a) g[a] = static_cast<scalar_t>(grad[a]);
  }
  __device__ __forceinline__ void clear_grad() {}
  __device__ __forceinline__ void finish_tile(int64_t /*tile*/) {}
};

// grid[n, p] = theta[n] @ [x, y, (z,) 1] with x, y, z the base coordinates of
// output position p; theta contiguous (N, Dims, Dims + 1) in acc_t.
template <typename acc_t, int Dims>
struct AffineSource {
  static constexpr int kCols = Dims + 1;
  static constexpr int kEntries = Dims * kCols;
  const acc_t* theta;
  int64_t out_size[3];
  bool align_corners;
  double* partials;             // (tiles, kEntries): one partial gradient per tile, or null
  double grad[kEntries];        // this thread's running sum over the current tile

  __device__ __forceinline__ void base_of(int64_t p, acc_t (&b)[Dims]) const {
#pragma unroll
    for (int a = 0; a < Dims; ++a) {
      const int64_t i = p % out_size[a];
      p /= out_size[a];
      b[a] = sampling::base_coordinate<acc_t>(i, out_size[a], align_corners);
    }
  }
  __device__ __forceinline__ void load(int64_t n, int64_t p, acc_t (&xyz)[Dims]) const {
    acc_t b[Dims];
    base_of(p, b);
    const acc_t* t = theta + n * kEntries;
#pragma unroll
    for (int r = 0; r < Dims; ++r) {
      acc_t v = t[r * kCols + Dims];
#pragma unroll
      for (int a = 0; a < Dims; ++a) v += t[r * kCols + a] * b[a];
      xyz[r] = v;
    }
  }
  __device__ __forceinline__ void clear_grad() {
#pragma unroll
    for (int q = 0; q < kEntries; ++q) grad[q] = 0.0;
  }
  __device__ __forceinline__ void store_grad(int64_t /*n*/, int64_t p, const acc_t (&g)[Dims]) {
    acc_t b[Dims];
    base_of(p, b);
#pragma unroll
    for (int r = 0; r < Dims; ++r) {
#pragma unroll
      for (int a = 0; a < Dims; ++a) grad[r * kCols + a] += double(g[r]) * double(b[a]);
      grad[r * kCols + Dims] += double(g[r]);
    }
  }
  // Block-wide: every thread of the block calls it once per tile.
  // Clearing unconditionally lets the compiler see the sums are zero at
  // each tile's start, so they are not kept live across the tile loop.
  __device__ __forceinline__ void finish_tile(int64_t tile) {
    if (partials != nullptr) block_sum_to<kEntries>(grad, partials + tile * kEntries);
    clear_grad();
  }
};

}  // namespace cuda
}  // namespace attnkernels
