// grid_sample's forward for a few channels (fp32, bilinear, zeros or border,
// AVX-512), vectorised over points and reading the input in its own
// (N, C, [D,] H, W) layout.
//
// With 1 to 4 channels the channel-vectorised sampler (sampler_loops.h) does
// little vector work per point and pays for a channels-last copy of the input;
// torch's 2-D kernel, vectorised over points, was ~2x faster on RGB images.
// Here each group of 16 consecutive output points gets its taps as vectors
// (PointTile::build_from_points_avx512) and each channel is one masked gather
// per tap and one contiguous store. A group with a non-finite or far-out
// coordinate is sampled point by point with the same NaN rules as the general
// sampler.
#pragma once

#include "../cpu_isa.h"
#include <ATen/Parallel.h>

#include <algorithm>

#include "point_tile.h"
#include "sampler_loops.h"

namespace attnkernels {
namespace cpu {
inline namespace ATTNKERNELS_CPU_ISA {  // see cpu_isa.h

constexpr int64_t kPlanarMaxChannels = 4;

#if defined(__AVX512F__)
// Whether planar_forward serves this call.
inline bool planar_forward_applies(const SamplerShape& s, int64_t interpolation) {
  return s.channels <= kPlanarMaxChannels && static_cast<Interpolation>(interpolation) == Interpolation::Bilinear &&
         s.padding != Padding::Reflection && s.in_points <= PointTile<float, 2>::kMaxTilePoints;
}

// out[n, c, p] for every output position; `input` (N, C, ...) contiguous fp32,
// `grid` (N, out_points, Dims) contiguous fp32.
template <int Dims, NanPolicy policy>
void planar_forward(const SamplerShape& s, const float* input, const float* grid, float* out) {
  using Tile = PointTile<float, Dims>;
  const int64_t P = s.out_points;
  const int64_t C = s.channels;
  const int64_t plane = s.in_points;
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
      if (build_tile(tile, points, count, s, false)) {
        const __mmask16 lanes = __mmask16((1u << count) - 1u);
        for (int64_t c = 0; c < C; ++c) _mm512_mask_storeu_ps(dst + c * P, lanes, tile.sample_avx512(item + c * plane));
        continue;
      }
      for (int64_t j = 0; j < count; ++j) {
        taps.template build<policy>(points + j * Dims, one_channel);
        for (int64_t c = 0; c < C; ++c) {
          // One channel at a time: the taps' offsets are within one plane.
          float acc;
          forward_block<1, float, policy>(taps, item + c * plane, 0, 0, &acc);
          dst[c * P + j] = acc;
        }
      }
    }
  });
}
#endif

}  // namespace ATTNKERNELS_CPU_ISA
}  // namespace cpu
}  // namespace attnkernels
