// grid_sample's forward for a few channels (fp32, bilinear, zeros or border,
// AVX-512), vectorised over points and reading the input in its own
// (N, C, [D,] H, W) layout.
//
// With 1 to 4 channels the channel-vectorised sampler (sampler_core.h) does
// little vector work per point and pays for a channels-last copy of the input;
// torch's 2-D kernel, vectorised over points, was ~2x faster on RGB images.
// Here each group of 16 consecutive output points gets its taps as vectors
// (RowTile::build_from_points_avx512) and each channel is one masked gather
// per tap and one contiguous store. A group with a non-finite or far-out
// coordinate is sampled point by point with the same NaN rules as the general
// sampler.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "point_tile.h"
#include "sampler_core.h"

namespace attnkernels {
namespace cpu {

constexpr int64_t kPlanarMaxChannels = 4;

#if defined(__AVX512F__)
// Whether planar_forward serves this call.
inline bool planar_forward_applies(const SamplerShape& s, int64_t interpolation) {
  return s.channels <= kPlanarMaxChannels && static_cast<Interpolation>(interpolation) == Interpolation::Bilinear &&
         s.padding != Padding::Reflection && s.in_points() <= RowTile<float, 2>::kMaxTilePoints;
}

// out[n, c, p] for every output position; `input` (N, C, ...) contiguous fp32,
// `grid` (N, out_points, Dims) contiguous fp32.
template <int Dims, NanPolicy policy>
void planar_forward(const SamplerShape& s, const float* input, const float* grid, float* out) {
  using Tile = RowTile<float, Dims>;
  const int64_t P = s.out_points();
  const int64_t C = s.channels;
  const int64_t plane = s.in_points();
  const int64_t groups_per_item = (P + kPointGroup - 1) / kPointGroup;
  SamplerShape one_channel = s;  // per-point fallback: offsets within one plane
  one_channel.channels = 1;
  at::parallel_for(0, s.batch * groups_per_item, 64, [&](int64_t begin, int64_t end) {
    Tile tile;
    PointTaps<float, Dims, Interpolation::Bilinear> taps;
    for (int64_t group = begin; group < end; ++group) {
      const int64_t n = group / groups_per_item;
      const int64_t p0 = (group - n * groups_per_item) * kPointGroup;
      const int64_t count = std::min(kPointGroup, P - p0);
      const float* points = grid + (n * P + p0) * Dims;
      const float* item = input + n * C * plane;
      float* dst = out + n * C * P + p0;
      const bool tiled = s.padding == Padding::Border
                             ? tile.template build_from_points_avx512<true, false>(points, count, s)
                             : tile.template build_from_points_avx512<false, false>(points, count, s);
      if (tiled) {
        const __mmask16 lanes = __mmask16((1u << count) - 1u);
        for (int64_t c = 0; c < C; ++c) {
          __m512 acc = _mm512_setzero_ps();
          for (int t = 0; t < Tile::kTaps; ++t) {
            const __m512i valid = _mm512_loadu_si512(tile.valid[t]);
            const __mmask16 inside = _mm512_test_epi32_mask(valid, valid);
            const __m512 value = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), inside,
                                                          _mm512_loadu_si512(tile.offset[t]), item + c * plane, 4);
            acc = _mm512_add_ps(acc, _mm512_maskz_mul_ps(inside, _mm512_loadu_ps(tile.weight[t]), value));
          }
          _mm512_mask_storeu_ps(dst + c * P, lanes, acc);
        }
        continue;
      }
      for (int64_t j = 0; j < count; ++j) {
        taps.template build<policy>(points + j * Dims, one_channel);
        for (int64_t c = 0; c < C; ++c) {
          const float* channel = item + c * plane;
          float acc = 0.0f;
          for (int t = 0; t < taps.kCount; ++t) {
            const float w = taps.weight[t];
            if (taps.valid[t]) {
              acc += w * channel[taps.offset[t]];
            } else if (policy == NanPolicy::Planar && !std::isfinite(w)) {
              acc += w * 0.0f;  // torch's 4-D kernel: NaN here
            }
          }
          dst[c * P + j] = acc;
        }
      }
    }
  });
}
#endif

}  // namespace cpu
}  // namespace attnkernels
