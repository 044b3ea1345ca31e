// PointTile's fp32 tile code in AVX2 intrinsics, for the avx2 variant (the
// compiler leaves PointTile's generic loops partly scalar, and the AVX-512
// versions need AVX-512). A 16-lane tile is two 8-lane __m256 halves: half h
// holds lanes [8h, 8h + 8). Masks are 32-bit integer lanes, all ones or zero.
//
// Same floating-point operations in the same order as PointTile's generic
// loops and AVX-512 code (no FMA: the sampling translation units compile with
// fp-contract=off), so every variant's tiles agree bit for bit.
#pragma once

#include "../cpu_isa.h"

#if defined(__AVX2__) && !defined(__AVX512F__)
#define ATTNKERNELS_TILES_AVX2 1
#endif

#if defined(ATTNKERNELS_TILES_AVX2)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../sampler_shape.h"

namespace attnkernels {
namespace cpu {
inline namespace ATTNKERNELS_CPU_ISA {  // see cpu_isa.h

template <typename acc_t, int Dims>
struct PointTile;

// All ones in the lanes of half `half` that come before lane `count` of the tile.
ATTNKERNELS_ALWAYS_INLINE __m256i first_lanes_avx2(int64_t count, int half) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(int32_t(count) - 8 * half), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// Lanes of half `half` whose tap `tap` lies inside the input (valid[] holds 0 or 1).
template <int Dims>
ATTNKERNELS_ALWAYS_INLINE __m256i inside_avx2(const PointTile<float, Dims>& tile, int tap, int half) {
  const __m256i valid = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile.valid[tap] + 8 * half));
  return _mm256_cmpgt_epi32(valid, _mm256_setzero_si256());
}

// The values of one input plane at taps `tap` (even) and tap + 1, its neighbour along x, in half
// `half` of the tile: 0 where a tap is outside. Lanes with both taps inside load them as one
// 64-bit pair (two 4-lane gathers for 16 values instead of two 8-lane ones); lanes with one of
// them inside gather it alone. No lane reads outside the input.
template <int Dims>
ATTNKERNELS_ALWAYS_INLINE void gather_pair_avx2(const PointTile<float, Dims>& tile, const float* plane, int tap, int half,
                                                __m256& low, __m256& high) {
  const __m256i in_low = inside_avx2(tile, tap, half), in_high = inside_avx2(tile, tap + 1, half);
  const __m256i both = _mm256_and_si256(in_low, in_high);
  const __m256i offsets = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile.offset[tap] + 8 * half));
  const auto* words = reinterpret_cast<const long long*>(plane);
  const __m256 first4 = _mm256_castsi256_ps(_mm256_mask_i32gather_epi64(
      _mm256_setzero_si256(), words, _mm256_castsi256_si128(offsets), _mm256_cvtepi32_epi64(_mm256_castsi256_si128(both)),
      4));
  const __m256 last4 = _mm256_castsi256_ps(_mm256_mask_i32gather_epi64(
      _mm256_setzero_si256(), words, _mm256_extracti128_si256(offsets, 1),
      _mm256_cvtepi32_epi64(_mm256_extracti128_si256(both, 1)), 4));
  // Within each 128-bit half: (first4[0], first4[2], last4[0], last4[2]); then the 64-bit quarters in order.
  low = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(first4, last4, 0x88)), 0xD8));
  high = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(first4, last4, 0xDD)), 0xD8));
  const __m256i low_alone = _mm256_andnot_si256(both, in_low), high_alone = _mm256_andnot_si256(both, in_high);
  if (!_mm256_testz_si256(low_alone, low_alone)) {
    low = _mm256_mask_i32gather_ps(low, plane, offsets, _mm256_castsi256_ps(low_alone), 4);
  }
  if (!_mm256_testz_si256(high_alone, high_alone)) {
    const __m256i high_offsets =
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile.offset[tap + 1] + 8 * half));
    high = _mm256_mask_i32gather_ps(high, plane, high_offsets, _mm256_castsi256_ps(high_alone), 4);
  }
}

// The taps from normalised coordinates, coords[axis][half]: taps_from_coords_avx512 for two halves.
template <bool border, bool with_dweight, bool with_quads = false, int Dims>
inline void taps_from_coords_avx2(PointTile<float, Dims>& tile, const __m256 (&coords)[Dims][2],
                                  const SamplerShape& s) {
  static_assert(Dims == 2 || Dims == 3, "tiles hold 2-D or 3-D taps");
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 two = _mm256_set1_ps(2.0f);  // GCC divides by it as a multiply by 0.5 (exact, the same result)
  const __m256 zero = _mm256_setzero_ps();
  const __m256 sign = _mm256_castsi256_ps(_mm256_set1_epi32(int32_t(0x80000000u)));
  const __m256i ones = _mm256_set1_epi32(1);
  for (int h = 0; h < 2; ++h) {
    // Per axis: the low tap's index, the low and high tap's offset, weight, d weight, and whether it is inside.
    __m256i low_of[Dims];
    __m256i offset_of[Dims][2];
    __m256 weight_of[Dims][2];
    __m256 dweight_of[Dims][2];
    __m256i inside_of[Dims][2];
    int32_t stride = 1;
    for (int r = 0; r < Dims; ++r) {
      const int32_t size = int32_t(s.in_size[r]);
      const float last = float(size - 1);
      const float scale = s.align_corners ? last / 2.0f : float(size) / 2.0f;
      const __m256 v = coords[r][h];
      const __m256 vlast = _mm256_set1_ps(last);
      // unnormalize(): align_corners: (v + 1) / 2 * last; else ((v + 1) * size - 1) / 2.
      __m256 x = s.align_corners
                     ? _mm256_mul_ps(_mm256_div_ps(_mm256_add_ps(v, one), two), vlast)
                     : _mm256_div_ps(_mm256_sub_ps(_mm256_mul_ps(_mm256_add_ps(v, one), _mm256_set1_ps(float(size))), one),
                                     two);
      __m256 slope = _mm256_set1_ps(scale);
      if constexpr (border) {
        const __m256 inside = _mm256_and_ps(_mm256_cmp_ps(x, zero, _CMP_GT_OQ), _mm256_cmp_ps(x, vlast, _CMP_LT_OQ));
        const __m256 low = _mm256_cmp_ps(x, zero, _CMP_LE_OQ);
        const __m256 clipped = _mm256_blendv_ps(vlast, zero, low);
        x = _mm256_blendv_ps(clipped, x, inside);
        slope = _mm256_and_ps(inside, slope);
      }
      const __m256 x0 = _mm256_round_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
      const __m256i i0 = _mm256_cvttps_epi32(x0);
      const __m256i i1 = _mm256_add_epi32(i0, ones);
      low_of[r] = i0;
      const __m256 frac = _mm256_sub_ps(x, x0);
      const __m256i vstride = _mm256_set1_epi32(stride);
      offset_of[r][0] = r == 0 ? i0 : _mm256_mullo_epi32(i0, vstride);
      offset_of[r][1] = r == 0 ? i1 : _mm256_mullo_epi32(i1, vstride);
      weight_of[r][0] = _mm256_sub_ps(one, frac);
      weight_of[r][1] = frac;
      dweight_of[r][0] = _mm256_xor_ps(slope, sign);  // -slope
      dweight_of[r][1] = slope;
      // 0 <= i < size as size > i > -1.
      const __m256i vsize = _mm256_set1_epi32(size);
      const __m256i below = _mm256_set1_epi32(-1);
      inside_of[r][0] = _mm256_and_si256(_mm256_cmpgt_epi32(i0, below), _mm256_cmpgt_epi32(vsize, i0));
      inside_of[r][1] = _mm256_and_si256(_mm256_cmpgt_epi32(i1, below), _mm256_cmpgt_epi32(vsize, i1));
      stride *= size;
    }
    for (int tap = 0; tap < PointTile<float, Dims>::kTaps; ++tap) {
      const int k[3] = {tap & 1, (tap >> 1) & 1, (tap >> 2) & 1};
      __m256i off = offset_of[0][k[0]];
      __m256i ok = inside_of[0][k[0]];
      __m256 w = weight_of[0][k[0]];
      for (int a = 1; a < Dims; ++a) {
        off = _mm256_add_epi32(off, offset_of[a][k[a]]);
        ok = _mm256_and_si256(ok, inside_of[a][k[a]]);
        w = _mm256_mul_ps(w, weight_of[a][k[a]]);
      }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(tile.offset[tap] + 8 * h), _mm256_and_si256(ok, off));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(tile.valid[tap] + 8 * h), _mm256_and_si256(ok, ones));
      _mm256_storeu_ps(tile.weight[tap] + 8 * h, w);
      if constexpr (with_dweight) {
        // d weight / d coordinate a: that axis's d weight times the other axes' weights, in axis order.
        for (int a = 0; a < Dims; ++a) {
          __m256 d = dweight_of[a][k[a]];
          for (int b = 0; b < Dims; ++b) {
            if (b != a) d = _mm256_mul_ps(d, weight_of[b][k[b]]);
          }
          _mm256_storeu_ps(tile.dweight[tap][a] + 8 * h, d);
        }
      }
    }
    if constexpr (with_quads) {
      // PointTile::quad: bordered indices run from -1 to size on every axis (x: the pair's low
      // tap up to size - 1); -1 < i < size + 1 as two comparisons.
      const __m256i below = _mm256_set1_epi32(-2);
      for (int pair = 0; pair < PointTile<float, Dims>::kTaps / 2; ++pair) {
        const __m256i x = low_of[0];
        __m256i ok = _mm256_and_si256(_mm256_cmpgt_epi32(x, below),
                                      _mm256_cmpgt_epi32(_mm256_set1_epi32(int32_t(s.in_size[0])), x));
        __m256i index = _mm256_add_epi32(x, ones);
        int32_t stride = int32_t(s.in_size[0]) + 2;
        for (int a = 1; a < Dims; ++a) {
          const __m256i i = _mm256_add_epi32(low_of[a], _mm256_set1_epi32((pair >> (a - 1)) & 1));
          ok = _mm256_and_si256(ok, _mm256_and_si256(_mm256_cmpgt_epi32(i, below),
                                                     _mm256_cmpgt_epi32(_mm256_set1_epi32(int32_t(s.in_size[a]) + 1), i)));
          index = _mm256_add_epi32(index, _mm256_mullo_epi32(_mm256_add_epi32(i, ones), _mm256_set1_epi32(stride)));
          stride *= int32_t(s.in_size[a]) + 2;
        }
        // -1 where not ok: index | ~ok would not do (index may have any bits); blend.
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(tile.quad[pair] + 8 * h),
                            _mm256_blendv_epi8(_mm256_set1_epi32(-1), index, ok));
      }
    }
  }
}

// PointTile::build() for fp32: the points with base x coordinates bx[0 .. 16)
// in the row at base (by, bz) of the batch item whose theta is `t`.
template <bool border, bool with_dweight, bool with_quads = false, int Dims>
inline void build_avx2(PointTile<float, Dims>& tile, const float* t, const float* bx, float by, float bz,
                       const SamplerShape& s) {
  constexpr int kCols = Dims + 1;
  __m256 coords[Dims][2];
  for (int h = 0; h < 2; ++h) {
    const __m256 base_x = _mm256_loadu_ps(bx + 8 * h);
    for (int r = 0; r < Dims; ++r) {
      // theta @ [x, y, (z,) 1], in AffineCoords::Cursor::load's order.
      __m256 v = _mm256_add_ps(_mm256_set1_ps(t[r * kCols + Dims]), _mm256_mul_ps(_mm256_set1_ps(t[r * kCols]), base_x));
      if constexpr (Dims > 1) v = _mm256_add_ps(v, _mm256_set1_ps(t[r * kCols + 1] * by));
      if constexpr (Dims > 2) v = _mm256_add_ps(v, _mm256_set1_ps(t[r * kCols + 2] * bz));
      coords[r][h] = v;
    }
  }
  taps_from_coords_avx2<border, with_dweight, with_quads>(tile, coords, s);
}

// The 8 points (x, y[, z]) stored interleaved from `p`, one vector per axis.
template <int Dims>
inline void deinterleave_points_avx2(const float* p, __m256 (&axes)[Dims]) {
  if constexpr (Dims == 2) {
    // a = x0 y0 x1 y1 | x2 y2 x3 y3, b = x4 y4 x5 y5 | x6 y6 x7 y7; the shuffles give x0 x1 x4 x5 | x2 x3 x6 x7.
    const __m256 a = _mm256_loadu_ps(p), b = _mm256_loadu_ps(p + 8);
    const __m256 xs = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0));
    const __m256 ys = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1));
    axes[0] = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(xs), _MM_SHUFFLE(3, 1, 2, 0)));
    axes[1] = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(ys), _MM_SHUFFLE(3, 1, 2, 0)));
  } else {
    // a = x0 y0 z0 x1 y1 z1 x2 y2, b = z2 x3 y3 z3 x4 y4 z4 x5, c = y5 z5 x6 y6 z6 x7 y7 z7:
    // each axis takes lanes of a, b and c in turn (blends), then is put in order (permute).
    const __m256 a = _mm256_loadu_ps(p), b = _mm256_loadu_ps(p + 8), c = _mm256_loadu_ps(p + 16);
    const __m256 xs = _mm256_blend_ps(_mm256_blend_ps(a, b, 0x92), c, 0x24);  // x0 x3 x6 x1 x4 x7 x2 x5
    const __m256 ys = _mm256_blend_ps(_mm256_blend_ps(a, b, 0x24), c, 0x49);  // y5 y0 y3 y6 y1 y4 y7 y2
    const __m256 zs = _mm256_blend_ps(_mm256_blend_ps(a, b, 0x49), c, 0x92);  // z2 z5 z0 z3 z6 z1 z4 z7
    axes[0] = _mm256_permutevar8x32_ps(xs, _mm256_setr_epi32(0, 3, 6, 1, 4, 7, 2, 5));
    axes[1] = _mm256_permutevar8x32_ps(ys, _mm256_setr_epi32(1, 4, 7, 2, 5, 0, 3, 6));
    axes[2] = _mm256_permutevar8x32_ps(zs, _mm256_setr_epi32(2, 5, 0, 3, 6, 1, 4, 7));
  }
}

// PointTile::build_from_points() for fp32: the taps of the first `count`
// (1..16) points stored interleaved from `points`; false, with nothing usable
// built, when a coordinate is not finite or beyond kTileReach.
template <bool border, bool with_dweight, bool with_quads = false, int Dims>
inline bool build_from_points_avx2(PointTile<float, Dims>& tile, const float* points, int64_t count,
                                   const SamplerShape& s) {
  constexpr int L = PointTile<float, Dims>::kLanes;
  float padded[L * Dims];
  if (count < L) {  // lanes past `count` take coordinate 0, as in build_from_points
    std::fill(std::copy(points, points + count * Dims, padded), padded + L * Dims, 0.0f);
    points = padded;
  }
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 reach = _mm256_set1_ps(PointTile<float, Dims>::kTileReach);
  __m256 coords[Dims][2];
  __m256 ok = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
  for (int h = 0; h < 2; ++h) {
    __m256 axes[Dims];
    deinterleave_points_avx2<Dims>(points + 8 * h * Dims, axes);
    for (int a = 0; a < Dims; ++a) {
      coords[a][h] = axes[a];
      ok = _mm256_and_ps(ok, _mm256_cmp_ps(_mm256_and_ps(axes[a], magnitude), reach, _CMP_LE_OQ));  // false for NaN
    }
  }
  if (_mm256_movemask_ps(ok) != 0xff) return false;
  taps_from_coords_avx2<border, with_dweight, with_quads>(tile, coords, s);
  return true;
}

// The bilinear samples of `channels` input planes (`plane_size` apart from
// `planes`) at the tile's first `count` points: dst[c * dst_stride + lane] =
// the sum over taps of weight * value, taps outside the input skipped (as 0).
// Channels go in groups of up to 4, so that each tap's offsets, mask and
// weights are loaded once per group; each channel sums in tap order.
template <int Dims>
inline void sample_avx2(const PointTile<float, Dims>& tile, const float* planes, int64_t plane_size,
                        int64_t channels, float* dst, int64_t dst_stride, int64_t count) {
  for (int h = 0; h < 2 && 8 * h < count; ++h) {
    const bool whole = count >= 8 * (h + 1);
    const __m256i lanes = first_lanes_avx2(count, h);
    auto group = [&](int64_t c0, auto size_tag) {
      constexpr int K = decltype(size_tag)::value;
      __m256 acc[K];
      for (int k = 0; k < K; ++k) acc[k] = _mm256_setzero_ps();
      for (int tap = 0; tap < PointTile<float, Dims>::kTaps; tap += 2) {  // x-neighbour taps in pairs
        const __m256 in_low = _mm256_castsi256_ps(inside_avx2(tile, tap, h));
        const __m256 in_high = _mm256_castsi256_ps(inside_avx2(tile, tap + 1, h));
        const __m256 w_low = _mm256_loadu_ps(tile.weight[tap] + 8 * h);
        const __m256 w_high = _mm256_loadu_ps(tile.weight[tap + 1] + 8 * h);
        for (int k = 0; k < K; ++k) {
          __m256 low, high;
          gather_pair_avx2(tile, planes + (c0 + k) * plane_size, tap, h, low, high);
          acc[k] = _mm256_add_ps(acc[k], _mm256_and_ps(in_low, _mm256_mul_ps(w_low, low)));
          acc[k] = _mm256_add_ps(acc[k], _mm256_and_ps(in_high, _mm256_mul_ps(w_high, high)));
        }
      }
      for (int k = 0; k < K; ++k) {
        float* at = dst + (c0 + k) * dst_stride + 8 * h;
        if (whole) _mm256_storeu_ps(at, acc[k]);
        else _mm256_maskstore_ps(at, lanes, acc[k]);
      }
    };
    for_channel_groups(channels, group);
  }
}

}  // namespace ATTNKERNELS_CPU_ISA
}  // namespace cpu
}  // namespace attnkernels

#endif  // ATTNKERNELS_TILES_AVX2
