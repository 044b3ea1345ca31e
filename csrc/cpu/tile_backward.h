// The backward of one tile of points (PointTile): the input gradient scattered
// from grad_output, and d output / d coordinate summed over channels per lane.
// Shared by the points-vectorised samplers: the fused affine rows
// (affine_rows.h) and grid_sample with few channels (planar_sampler.h).
#pragma once

// point_tile.h brings the variant's intrinsics headers, <cstdint> and <type_traits>.
#include "point_tile.h"

namespace attnkernels {
namespace cpu {
inline namespace ATTNKERNELS_CPU_ISA {  // see cpu_isa.h

// grads[c * plane_size + offset] += weight * g[c * kLanes + lane] for every
// valid tap of the first `count` lanes and every channel c: each tap's offset
// and weight are read once for all channels. Scalar: AVX-512 gather +
// conflict check + scatter measured slower here (7.3 ms against 6.7 ms for
// the input gradient of 4x3x16x112x112).
template <typename acc_t, int Dims>
inline void scatter_tile(const PointTile<acc_t, Dims>& tile, acc_t* grads, int64_t plane_size, int64_t channels,
                         const acc_t* g, int64_t count) {
  constexpr int L = PointTile<acc_t, Dims>::kLanes;
  for (int64_t l = 0; l < count; ++l) {
    for (int tap = 0; tap < PointTile<acc_t, Dims>::kTaps; ++tap) {
      if (!tile.valid[tap][l]) continue;
      acc_t* at = grads + tile.offset[tap][l];
      const acc_t w = tile.weight[tap][l];
      for (int64_t c = 0; c < channels; ++c) at[c * plane_size] += w * g[c * L + l];
    }
  }
}

// The same scatter into channels-last gradients: grads[offset * channels + c]
// += weight * g[lane * channels + c], a contiguous run of channels per tap.
// With many channels the planar scatter's channel stride (a whole plane) maps
// every channel of a tap to the same cache set; this layout does not.
template <typename acc_t, int Dims>
inline void scatter_tile_channels_last(const PointTile<acc_t, Dims>& tile, acc_t* grads, int64_t channels,
                                       const acc_t* g, int64_t count) {
  for (int64_t l = 0; l < count; ++l) {
    const acc_t* lane_grad = g + l * channels;
    for (int tap = 0; tap < PointTile<acc_t, Dims>::kTaps; ++tap) {
      if (!tile.valid[tap][l]) continue;
      acc_t* at = grads + int64_t(tile.offset[tap][l]) * channels;
      const acc_t w = tile.weight[tap][l];
#pragma omp simd
      for (int64_t c = 0; c < channels; ++c) at[c] += w * lane_grad[c];
    }
  }
}

// Up to this many channels the input gradient is scattered planar (N, C, points);
// above, channels-last (N, points, C) and transposed once at the end.
constexpr int64_t kPlanarScatterMaxChannels = 4;

inline bool scatter_channels_last(int64_t channels) { return channels > kPlanarScatterMaxChannels; }

#if defined(__AVX512F__)
// grad_xyz[a][lane] += sum over channels c of g[c][lane] * sum over taps of
// dweight[tap][a] * input[c][tap] (fp32). Channels go in groups of up to 4, so
// that each tap's offsets, mask and d weights are loaded once per group.
template <int Dims>
inline void coordinate_grads_avx512(const PointTile<float, Dims>& tile, const float* input, int64_t plane_size,
                                    int64_t channels, const float* grad_out, int64_t out_plane, int64_t count,
                                    float (*grad_xyz)[PointTile<float, Dims>::kLanes]) {
  using Tile = PointTile<float, Dims>;
  const __mmask16 lanes = __mmask16((1u << count) - 1u);
  __m512 total[Dims];
  for (int a = 0; a < Dims; ++a) total[a] = _mm512_setzero_ps();
  auto group = [&](int64_t c0, auto size_tag) {
    constexpr int K = decltype(size_tag)::value;
    __m512 sums[K][Dims];
    for (int k = 0; k < K; ++k) {
      for (int a = 0; a < Dims; ++a) sums[k][a] = _mm512_setzero_ps();
    }
    for (int tap = 0; tap < Tile::kTaps; tap += 2) {  // x-neighbour taps in pairs
      __m512 dweight[2][Dims];
      for (int t = 0; t < 2; ++t) {
        for (int a = 0; a < Dims; ++a) dweight[t][a] = _mm512_loadu_ps(tile.dweight[tap + t][a]);
      }
      for (int k = 0; k < K; ++k) {
        __m512 values[2];
        tile.gather_pair_avx512(input + (c0 + k) * plane_size, tap, values[0], values[1]);
        for (int t = 0; t < 2; ++t) {
          for (int a = 0; a < Dims; ++a) {
            sums[k][a] = _mm512_add_ps(sums[k][a], _mm512_mul_ps(dweight[t][a], values[t]));
          }
        }
      }
    }
    for (int k = 0; k < K; ++k) {
      const __m512 grad = _mm512_maskz_loadu_ps(lanes, grad_out + (c0 + k) * out_plane);
      for (int a = 0; a < Dims; ++a) total[a] = _mm512_add_ps(total[a], _mm512_mul_ps(sums[k][a], grad));
    }
  };
  for_channel_groups(channels, group);
  // Lanes past the row end: grad is 0 there, but 0 * (a value of an arbitrary point) may be NaN.
  for (int a = 0; a < Dims; ++a) _mm512_storeu_ps(grad_xyz[a], _mm512_maskz_mov_ps(lanes, total[a]));
}
#endif

#if defined(ATTNKERNELS_TILES_AVX2)
// coordinate_grads_avx512 in AVX2, one 8-lane half of the tile after the other.
// Channels go in groups of up to 4 (2 in 3-D, to fit the 16 registers).
template <int Dims>
inline void coordinate_grads_avx2(const PointTile<float, Dims>& tile, const float* input, int64_t plane_size,
                                  int64_t channels, const float* grad_out, int64_t out_plane, int64_t count,
                                  float (*grad_xyz)[PointTile<float, Dims>::kLanes]) {
  using Tile = PointTile<float, Dims>;
  constexpr int kGroup = Dims == 2 ? 4 : 2;
  for (int h = 0; h < 2; ++h) {
    if (8 * h >= count) {  // no lanes in this half
      for (int a = 0; a < Dims; ++a) _mm256_storeu_ps(grad_xyz[a] + 8 * h, _mm256_setzero_ps());
      continue;
    }
    const __m256i lanes = first_lanes_avx2(count, h);
    __m256 total[Dims];
    for (int a = 0; a < Dims; ++a) total[a] = _mm256_setzero_ps();
    auto group = [&](int64_t c0, auto size_tag) {
      constexpr int K = decltype(size_tag)::value;
      __m256 sums[K][Dims];
      for (int k = 0; k < K; ++k) {
        for (int a = 0; a < Dims; ++a) sums[k][a] = _mm256_setzero_ps();
      }
      for (int tap = 0; tap < Tile::kTaps; tap += 2) {  // x-neighbour taps in pairs
        for (int k = 0; k < K; ++k) {
          __m256 values[2];
          gather_pair_avx2(tile, input + (c0 + k) * plane_size, tap, h, values[0], values[1]);
          for (int t = 0; t < 2; ++t) {
            for (int a = 0; a < Dims; ++a) {
              sums[k][a] = _mm256_add_ps(sums[k][a], _mm256_mul_ps(_mm256_loadu_ps(tile.dweight[tap + t][a] + 8 * h),
                                                                   values[t]));
            }
          }
        }
      }
      for (int k = 0; k < K; ++k) {
        const __m256 grad = _mm256_maskload_ps(grad_out + (c0 + k) * out_plane + 8 * h, lanes);
        for (int a = 0; a < Dims; ++a) total[a] = _mm256_add_ps(total[a], _mm256_mul_ps(sums[k][a], grad));
      }
    };
    for_channel_groups<kGroup>(channels, group);
    // Lanes past the row end: grad is 0 there, but 0 * (a value of an arbitrary point) may be NaN.
    for (int a = 0; a < Dims; ++a) {
      _mm256_storeu_ps(grad_xyz[a] + 8 * h, _mm256_and_ps(_mm256_castsi256_ps(lanes), total[a]));
    }
  }
}
#endif

// One tile's backward for batch item n. `input` and `grad_out` point at item n
// (grad_out at the tile's first point) in the (C, points) layout; `grads`, when
// given, at item n of an input-gradient buffer laid out (C, in_points) or, when
// scatter_channels_last(C), (in_points, C); `tile_grads` has room for C * kLanes
// values. With `grad_xyz`, adds sum over c of grad_out * d sample / d coordinate
// to grad_xyz[axis][lane]; lanes past `count` hold values to ignore.
template <typename scalar_t, typename acc_t, int Dims>
inline void tile_backward(const PointTile<acc_t, Dims>& tile, const scalar_t* input, int64_t in_plane,
                          const scalar_t* grad_out, int64_t out_plane, int64_t C, int64_t count, acc_t* grads,
                          acc_t* tile_grads, acc_t (*grad_xyz)[PointTile<acc_t, Dims>::kLanes]) {
  using Tile = PointTile<acc_t, Dims>;
  constexpr int L = Tile::kLanes;
  // Two channel loops: the scatters first, then the gathers for the coordinate gradient
  // (interleaving them measured 30% slower than the two apart).
  if (grads != nullptr && scatter_channels_last(C)) {
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* go = grad_out + c * out_plane;
      for (int64_t l = 0; l < count; ++l) tile_grads[l * C + c] = static_cast<acc_t>(go[l]);
    }
    scatter_tile_channels_last(tile, grads, C, tile_grads, count);
  } else if (grads != nullptr) {
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* go = grad_out + c * out_plane;
      for (int l = 0; l < L; ++l) tile_grads[c * L + l] = l < count ? static_cast<acc_t>(go[l]) : acc_t(0);
    }
    scatter_tile(tile, grads, in_plane, C, tile_grads, count);
  }
  if (grad_xyz == nullptr) return;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
    coordinate_grads_avx512(tile, input, in_plane, C, grad_out, out_plane, count, grad_xyz);
    return;
  }
#elif defined(ATTNKERNELS_TILES_AVX2)
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
    coordinate_grads_avx2(tile, input, in_plane, C, grad_out, out_plane, count, grad_xyz);
    return;
  }
#endif
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t* go = grad_out + c * out_plane;
    acc_t g[L];
    for (int l = 0; l < L; ++l) g[l] = l < count ? static_cast<acc_t>(go[l]) : acc_t(0);
    const scalar_t* plane = input + c * in_plane;
    acc_t direction[Dims][L] = {};
    for (int tap = 0; tap < Tile::kTaps; ++tap) {
#pragma omp simd
      for (int l = 0; l < L; ++l) {
        const acc_t value = tile.valid[tap][l] ? static_cast<acc_t>(plane[tile.offset[tap][l]]) : acc_t(0);
        for (int a = 0; a < Dims; ++a) direction[a][l] += tile.dweight[tap][a][l] * value;
      }
    }
    for (int a = 0; a < Dims; ++a) {
#pragma omp simd
      for (int l = 0; l < L; ++l) grad_xyz[a][l] += direction[a][l] * g[l];
    }
  }
}

}  // namespace ATTNKERNELS_CPU_ISA
}  // namespace cpu
}  // namespace attnkernels
