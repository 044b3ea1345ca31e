// The CUDA sampling kernels of grid_sample and the fused affine_grid_sample,
// forward and backward, over the per-point code of sampler_points.cuh (whose
// opening comment describes the layouts, indexing and coordinate sources).
#pragma once

#include <cstdint>

#include "sampler_points.cuh"

namespace attnkernels {
namespace cuda {

// ---------------------------------------------------------------- forward kernels

// Where a tile of points starts: tiles never straddle batch items.
struct TileStart {
  int64_t n;
  int64_t p;
};
__device__ __forceinline__ TileStart tile_start(int64_t tile, int64_t tiles_per_item, int64_t points_per_tile) {
  const int64_t n = tile / tiles_per_item;
  return {n, (tile - n * tiles_per_item) * points_per_tile};
}

// acc = sum over taps of weight * src[tap offset], as the CPU kernels sum it
// (tap order, non-finite weights on out-of-range taps in 4-D give NaN).
template <typename acc_t, typename scalar_t, typename index_t, typename Taps, NanPolicy policy>
__device__ __forceinline__ acc_t sample_one(const Taps& taps, const scalar_t* __restrict__ src,
                                            const index_t (&stride)[3]) {
  acc_t acc = acc_t(0);
#pragma unroll
  for (int t = 0; t < Taps::kCount; ++t) {
    const acc_t w = taps.weight(t);
    if (taps.valid(t)) {
      acc += w * static_cast<acc_t>(src[taps.offset(t, stride)]);
    } else if (policy == NanPolicy::Sampler2d && !isfinite(w)) {
      acc += w * acc_t(0);
    }
  }
  return acc;
}

// One thread per output point, looping over channels: reads of channel-planar
// (N, C, ...) input are coalesced across neighbouring points, writes of the
// (N, C, P) output are coalesced. Serves any input strides.
template <typename scalar_t, typename acc_t, typename index_t, int Dims, Interpolation mode, NanPolicy policy,
          typename Source>
__global__ void __launch_bounds__(kPointwiseThreads)
    sample_forward_pointwise(SamplerShape g, InputView<scalar_t, index_t> in, Source source,
                             scalar_t* __restrict__ out, int64_t tiles_per_item, int64_t tiles) {
  const index_t C = static_cast<index_t>(g.channels);
  const index_t P = static_cast<index_t>(g.out_points);
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const TileStart start = tile_start(tile, tiles_per_item, kPointwiseThreads);
    const index_t p = static_cast<index_t>(start.p) + static_cast<index_t>(threadIdx.x);
    if (p >= P) continue;
    acc_t xyz[Dims];
    source.load(start.n, p, xyz);
    PointTaps<acc_t, Dims, mode, policy> taps;
    taps.build(xyz, g);
    const scalar_t* src = in.data + start.n * in.stride_batch;
    scalar_t* dst = out + start.n * g.channels * g.out_points + p;
    for (index_t c = 0; c < C; ++c) {
      const acc_t acc = sample_one<acc_t, scalar_t, index_t, decltype(taps), policy>(taps, src, in.stride);
      dst[c * P] = static_cast<scalar_t>(acc);
      src += in.stride_channel;
    }
  }
}

// Channels-last input (channel stride 1): lanes are channels, so each tap is
// one coalesced read of up to 32 consecutive channels. A warp owns 32 points;
// with fewer than 32 channels the warp splits into 32 / G lane groups of
// G = 2^group_log2 channels, each group taking every (32 / G)-th point. Each
// warp transposes its (channels x 32 points) results through shared memory so
// that the (N, C, P) output is written 32 consecutive points at a time.
template <typename scalar_t, typename acc_t, typename index_t, int Dims, Interpolation mode, NanPolicy policy,
          typename Source>
__global__ void __launch_bounds__(kSamplerThreads)
    sample_forward_channels_last(SamplerShape g, InputView<scalar_t, index_t> in, Source source,
                                 scalar_t* __restrict__ out, int group_log2, int64_t tiles_per_item, int64_t tiles) {
  __shared__ acc_t transpose[kSamplerWarps][kWarpSize][kWarpSize + 1];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int group_width = 1 << group_log2;
  const int groups = kWarpSize >> group_log2;
  const int group = lane >> group_log2;
  const int member = lane & (group_width - 1);
  const index_t C = static_cast<index_t>(g.channels);
  const index_t P = static_cast<index_t>(g.out_points);
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const TileStart start = tile_start(tile, tiles_per_item, kPointsPerSamplerTile);
    const index_t first = static_cast<index_t>(start.p) + warp * kPointsPerWarp;
    const scalar_t* src = in.data + start.n * in.stride_batch;
    scalar_t* dst = out + start.n * g.channels * g.out_points;
    for (index_t c0 = 0; c0 < C; c0 += group_width) {
      const index_t c = c0 + member;
      for (int j = group; j < kPointsPerWarp; j += groups) {
        const index_t p = first + j;
        acc_t acc = acc_t(0);
        if (p < P) {
          acc_t xyz[Dims];
          source.load(start.n, p, xyz);
          PointTaps<acc_t, Dims, mode, policy> taps;
          taps.build(xyz, g);
          if (c < C) acc = sample_one<acc_t, scalar_t, index_t, decltype(taps), policy>(taps, src + c, in.stride);
        }
        transpose[warp][member][j] = acc;
      }
      __syncwarp();
      const index_t p = first + lane;
      for (int r = 0; r < group_width && c0 + r < C; ++r) {
        if (p < P) dst[(c0 + r) * P + p] = static_cast<scalar_t>(transpose[warp][r][lane]);
      }
      __syncwarp();
    }
  }
}

// ---------------------------------------------------------------- backward kernel

// The backward of one tile: lanes are channels (groups of G = 2^group_log2
// lanes, as in the channels-last forward), each group walks a contiguous run
// of G points.
//  - Input gradient (when grad_source is not null): weight * grad_output is
//    added to the channels-last buffer with atomics on 32 consecutive
//    addresses per warp instruction, never on one contended address. For
//    nearest and (bi/tri)linear taps, consecutive points that hit the same
//    input position in the same tap slot (upsampling, smooth warps) are
//    summed in registers first and added once ("aggregated atomics").
//  - Coordinate gradient (when need_coords): per point, the dot product over
//    channels of d weight and input, reduced over the group's lanes with
//    shuffles, accumulated over channel chunks in shared memory, and handed
//    to the source; no atomics, so it is deterministic.
template <typename scalar_t, typename acc_t, typename index_t, int Dims, Interpolation mode, NanPolicy policy,
          typename Source>
__global__ void __launch_bounds__(kSamplerThreads)
    sample_backward_kernel(SamplerShape g, InputView<scalar_t, index_t> in, Source source,
                           const scalar_t* __restrict__ grad_out, acc_t* __restrict__ grad_source, bool need_coords,
                           int group_log2, int64_t tiles_per_item, int64_t tiles) {
  using Taps = PointTaps<acc_t, Dims, mode, policy>;
  constexpr bool kHasCoordGrad = mode != Interpolation::Nearest;
  constexpr bool kAggregate = Taps::K <= 2;
  constexpr int kSlots = kAggregate ? Taps::kCount : 1;
  __shared__ acc_t coord_grad[kSamplerWarps][kPointsPerWarp][Dims];
  // This chunk's grad_output for the warp's 32 points, [channel][point]: read
  // from the (N, C, P) layout 32 consecutive points at a time.
  __shared__ acc_t grad_tile[kSamplerWarps][kWarpSize][kPointsPerWarp + 1];

  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int group_width = 1 << group_log2;
  const int group = lane >> group_log2;
  const int member = lane & (group_width - 1);
  const index_t C = static_cast<index_t>(g.channels);
  const index_t P = static_cast<index_t>(g.out_points);
  // Spatial strides of the channels-last gradient buffer, in positions.
  const index_t position_stride[3] = {1, static_cast<index_t>(g.in_size[0]),
                                      static_cast<index_t>(g.in_size[0] * g.in_size[1])};
  const bool coords_wanted = kHasCoordGrad && need_coords;
  source.clear_grad();

  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const TileStart start = tile_start(tile, tiles_per_item, kPointsPerSamplerTile);
    const index_t warp_first = static_cast<index_t>(start.p) + warp * kPointsPerWarp;
    const index_t run_first = warp_first + group * group_width;  // this group's run of G points
    const scalar_t* src = in.data + start.n * in.stride_batch;
    const scalar_t* go = grad_out + start.n * g.channels * g.out_points;
    acc_t* grads = grad_source == nullptr ? nullptr : grad_source + start.n * g.in_points * g.channels;

    if (coords_wanted) {
#pragma unroll
      for (int a = 0; a < Dims; ++a) coord_grad[warp][lane][a] = acc_t(0);
      __syncwarp();
    }
    for (index_t c0 = 0; c0 < C; c0 += group_width) {
      const index_t c = c0 + member;
      const bool active = c < C;
      {
        const index_t p = warp_first + lane;
        for (int r = 0; r < group_width; ++r) {
          const bool ok = c0 + r < C && p < P;
          grad_tile[warp][r][lane] = ok ? static_cast<acc_t>(go[(c0 + r) * P + p]) : acc_t(0);
        }
        __syncwarp();
      }
      index_t pending_position[kSlots];
      acc_t pending_value[kSlots];
#pragma unroll
      for (int s = 0; s < kSlots; ++s) {
        pending_position[s] = -1;
        pending_value[s] = acc_t(0);
      }
      for (int j = 0; j < group_width; ++j) {
        const index_t p = run_first + j;
        const bool point_ok = p < P;  // uniform within the group
        Taps taps;
        acc_t xyz[Dims];
#pragma unroll
        for (int a = 0; a < Dims; ++a) xyz[a] = acc_t(0);
        if (point_ok) source.load(start.n, p, xyz);
        taps.build(xyz, g);
        const acc_t grad = grad_tile[warp][member][group * group_width + j];  // 0 unless point_ok && active
        acc_t coord_partial[Dims];
#pragma unroll
        for (int a = 0; a < Dims; ++a) coord_partial[a] = acc_t(0);
#pragma unroll
        for (int t = 0; t < Taps::kCount; ++t) {
          if (!point_ok || !taps.valid(t)) continue;
          if (grads != nullptr && active) {
            const index_t position = taps.offset(t, position_stride);
            const acc_t contribution = taps.weight(t) * grad;
            if constexpr (kAggregate) {
              if (pending_position[t] == position) {
                pending_value[t] += contribution;
              } else {
                if (pending_position[t] >= 0) atomicAdd(grads + pending_position[t] * C + c, pending_value[t]);
                pending_position[t] = position;
                pending_value[t] = contribution;
              }
            } else {
              atomicAdd(grads + position * C + c, contribution);
            }
          }
          if (coords_wanted && active) {
            const acc_t dot = static_cast<acc_t>(src[c * in.stride_channel + taps.offset(t, in.stride)]) * grad;
#pragma unroll
            for (int a = 0; a < Dims; ++a) coord_partial[a] += taps.dweight(t, a) * dot;
          }
        }
        if (coords_wanted) {
#pragma unroll
          for (int a = 0; a < Dims; ++a) {
            const acc_t total = group_sum(coord_partial[a], group_width);
            if (member == 0) coord_grad[warp][group * group_width + j][a] += total;
          }
        }
      }
      if constexpr (kAggregate) {
        if (grads != nullptr && active) {
#pragma unroll
          for (int s = 0; s < kSlots; ++s) {
            if (pending_position[s] >= 0) atomicAdd(grads + pending_position[s] * C + c, pending_value[s]);
          }
        }
      }
      __syncwarp();  // grad_tile is restaged for the next chunk
    }
    if (need_coords) {
      __syncwarp();
      const index_t p = warp_first + lane;
      if (p < P) {
        acc_t grad[Dims];
#pragma unroll
        for (int a = 0; a < Dims; ++a) grad[a] = kHasCoordGrad ? coord_grad[warp][lane][a] : acc_t(0);
        source.store_grad(start.n, p, grad);
      }
      __syncwarp();
    }
    source.finish_tile(tile);
  }
}

// ---------------------------------------------------------------- deterministic input gradient
// Pass 1 writes, for every (point, tap) pair m = point * kCount + t, the
// destination key n * in_points + position (or kNoKey for a tap outside the
// input) and its weight. The host stably sorts the keys; pass 2 gives each
// run of equal keys to one warp, which sums its contributions in point order
// and writes the buffer once. No atomics: the result is bitwise reproducible.

constexpr int64_t kNoKey = INT64_MAX;

template <typename acc_t, int Dims, Interpolation mode, NanPolicy policy, typename Source>
__global__ void __launch_bounds__(kPointwiseThreads)
    tap_keys_kernel(SamplerShape g, Source source, int64_t* __restrict__ keys, acc_t* __restrict__ weights,
                    int64_t tiles_per_item, int64_t tiles) {
  using Taps = PointTaps<acc_t, Dims, mode, policy>;
  const int64_t position_stride[3] = {1, g.in_size[0], g.in_size[0] * g.in_size[1]};
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const TileStart start = tile_start(tile, tiles_per_item, kPointwiseThreads);
    const int64_t p = start.p + threadIdx.x;
    if (p >= g.out_points) continue;
    acc_t xyz[Dims];
    source.load(start.n, p, xyz);
    Taps taps;
    taps.build(xyz, g);
    const int64_t first = (start.n * g.out_points + p) * Taps::kCount;
#pragma unroll
    for (int t = 0; t < Taps::kCount; ++t) {
      const bool ok = taps.valid(t);
      keys[first + t] = ok ? start.n * g.in_points + taps.offset(t, position_stride) : kNoKey;
      weights[first + t] = ok ? taps.weight(t) : acc_t(0);
    }
  }
}

// blockDim (32, 8): x = channel within the chunk blockIdx.y, y = sorted pair.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kPointwiseThreads)
    sum_sorted_taps_kernel(const int64_t* __restrict__ sorted_keys, const int64_t* __restrict__ order,
                           const acc_t* __restrict__ weights, const scalar_t* __restrict__ grad_out,
                           acc_t* __restrict__ grad_source, int64_t pairs, int taps_per_point, int64_t channels,
                           int64_t out_points) {
  const int64_t c = int64_t(blockIdx.y) * kWarpSize + threadIdx.x;
  if (c >= channels) return;
  for (int64_t j = int64_t(blockIdx.x) * blockDim.y + threadIdx.y; j < pairs; j += int64_t(gridDim.x) * blockDim.y) {
    const int64_t key = sorted_keys[j];
    if (key == kNoKey) return;  // sorted: every later key is kNoKey too
    if (j > 0 && sorted_keys[j - 1] == key) continue;  // not the head of its run
    acc_t acc = acc_t(0);
    for (int64_t m = j; m < pairs && sorted_keys[m] == key; ++m) {
      const int64_t pair = order[m];
      const int64_t point = pair / taps_per_point;
      const int64_t n = point / out_points;
      const int64_t p = point - n * out_points;
      acc += weights[pair] * static_cast<acc_t>(grad_out[(n * channels + c) * out_points + p]);
    }
    grad_source[key * channels + c] = acc;
  }
}

// ---------------------------------------------------------------- affine_grid

// grid[n, p, :] = theta[n] @ [base(p), 1], one thread per point.
template <typename scalar_t, typename acc_t, int Dims>
__global__ void __launch_bounds__(kPointwiseThreads)
    affine_grid_kernel(AffineSource<acc_t, Dims> source, scalar_t* __restrict__ grid, int64_t points,
                       int64_t tiles_per_item, int64_t tiles) {
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const TileStart start = tile_start(tile, tiles_per_item, kPointwiseThreads);
    const int64_t p = start.p + threadIdx.x;
    if (p >= points) continue;
    acc_t xyz[Dims];
    source.load(start.n, p, xyz);
    scalar_t* out = grid + (start.n * points + p) * Dims;
#pragma unroll
    for (int a = 0; a < Dims; ++a) out[a] = static_cast<scalar_t>(xyz[a]);
  }
}

// Partial grad_theta per tile from grad_grid (N, P, Dims), contiguous.
template <typename scalar_t, typename acc_t, int Dims>
__global__ void __launch_bounds__(kPointwiseThreads)
    affine_grid_backward_kernel(AffineSource<acc_t, Dims> source, const scalar_t* __restrict__ grad_grid,
                                int64_t points, int64_t tiles_per_item, int64_t tiles) {
  source.clear_grad();
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const TileStart start = tile_start(tile, tiles_per_item, kPointwiseThreads);
    const int64_t p = start.p + threadIdx.x;
    if (p < points) {
      const scalar_t* in = grad_grid + (start.n * points + p) * Dims;
      acc_t grad[Dims];
#pragma unroll
      for (int a = 0; a < Dims; ++a) grad[a] = static_cast<acc_t>(in[a]);
      source.store_grad(start.n, p, grad);
    }
    source.finish_tile(tile);
  }
}

}  // namespace cuda
}  // namespace attnkernels
