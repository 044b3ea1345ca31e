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
#include <vector>

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

// The values of one input plane at a tap (`in_low`: all ones in the lanes where it is inside,
// `off_low` their offsets) and at its neighbour along x (offset + 1 where both are inside;
// `in_high`, `off_high`), 8 lanes: 0 where a tap is outside. Lanes with both taps inside load them
// as one 64-bit pair (two 4-lane gathers for 16 values instead of two 8-lane ones); lanes with one
// of them inside gather it alone. No lane reads outside the input.
ATTNKERNELS_ALWAYS_INLINE void gather_pair_avx2(const float* plane, __m256i in_low, __m256i in_high, __m256i off_low,
                                                __m256i off_high, __m256& low, __m256& high) {
  const __m256i both = _mm256_and_si256(in_low, in_high);
  const auto* words = reinterpret_cast<const long long*>(plane);
  const __m256 first4 = _mm256_castsi256_ps(_mm256_mask_i32gather_epi64(
      _mm256_setzero_si256(), words, _mm256_castsi256_si128(off_low), _mm256_cvtepi32_epi64(_mm256_castsi256_si128(both)),
      4));
  const __m256 last4 = _mm256_castsi256_ps(_mm256_mask_i32gather_epi64(
      _mm256_setzero_si256(), words, _mm256_extracti128_si256(off_low, 1),
      _mm256_cvtepi32_epi64(_mm256_extracti128_si256(both, 1)), 4));
  // Within each 128-bit half: (first4[0], first4[2], last4[0], last4[2]); then the 64-bit quarters in order.
  low = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(first4, last4, 0x88)), 0xD8));
  high = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(first4, last4, 0xDD)), 0xD8));
  const __m256i low_alone = _mm256_andnot_si256(both, in_low), high_alone = _mm256_andnot_si256(both, in_high);
  if (!_mm256_testz_si256(low_alone, low_alone)) {
    low = _mm256_mask_i32gather_ps(low, plane, off_low, _mm256_castsi256_ps(low_alone), 4);
  }
  if (!_mm256_testz_si256(high_alone, high_alone)) {
    high = _mm256_mask_i32gather_ps(high, plane, off_high, _mm256_castsi256_ps(high_alone), 4);
  }
}

// gather_pair_avx2 for the tile's taps `tap` (even) and tap + 1 in half `half`.
template <int Dims>
ATTNKERNELS_ALWAYS_INLINE void gather_pair_avx2(const PointTile<float, Dims>& tile, const float* plane, int tap, int half,
                                                __m256& low, __m256& high) {
  const auto offsets = [&](int t) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile.offset[t] + 8 * half));
  };
  gather_pair_avx2(plane, inside_avx2(tile, tap, half), inside_avx2(tile, tap + 1, half), offsets(tap),
                   offsets(tap + 1), low, high);
}

// Per axis of 8 lanes: the low tap's index, and for the low and high tap the offset, weight,
// d weight and whether it is inside (all ones or zero).
struct AxisVectors8 {
  __m256i low;
  __m256i offset[2];
  __m256 weight[2];
  __m256 dweight[2];
  __m256i inside[2];
};

// Per tap of 8 lanes: the offset within an input plane (any value where the tap is outside),
// whether it is inside (all ones or zero), the weight.
template <int Dims>
struct TapVectors8 {
  static constexpr int kTaps = 1 << Dims;
  __m256i offset[kTaps];
  __m256i inside[kTaps];
  __m256 weight[kTaps];
};

// The AxisVectors8 of one half's normalised coordinates, coords[axis].
template <bool border, int Dims>
ATTNKERNELS_ALWAYS_INLINE void axis_vectors_avx2(const __m256 (&coords)[Dims], const SamplerShape& s,
                                                 AxisVectors8 (&axes)[Dims]) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 two = _mm256_set1_ps(2.0f);  // GCC divides by it as a multiply by 0.5 (exact, the same result)
  const __m256 zero = _mm256_setzero_ps();
  const __m256 sign = _mm256_castsi256_ps(_mm256_set1_epi32(int32_t(0x80000000u)));
  const __m256i ones = _mm256_set1_epi32(1);
  int32_t stride = 1;
  for (int r = 0; r < Dims; ++r) {
    const int32_t size = int32_t(s.in_size[r]);
    const float last = float(size - 1);
    const float scale = s.align_corners ? last / 2.0f : float(size) / 2.0f;
    const __m256 v = coords[r];
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
    const __m256 frac = _mm256_sub_ps(x, x0);
    const __m256i vstride = _mm256_set1_epi32(stride);
    AxisVectors8& axis = axes[r];
    axis.low = i0;
    axis.offset[0] = r == 0 ? i0 : _mm256_mullo_epi32(i0, vstride);
    axis.offset[1] = r == 0 ? i1 : _mm256_mullo_epi32(i1, vstride);
    axis.weight[0] = _mm256_sub_ps(one, frac);
    axis.weight[1] = frac;
    axis.dweight[0] = _mm256_xor_ps(slope, sign);  // -slope
    axis.dweight[1] = slope;
    // 0 <= i < size as size > i > -1.
    const __m256i vsize = _mm256_set1_epi32(size);
    const __m256i below = _mm256_set1_epi32(-1);
    axis.inside[0] = _mm256_and_si256(_mm256_cmpgt_epi32(i0, below), _mm256_cmpgt_epi32(vsize, i0));
    axis.inside[1] = _mm256_and_si256(_mm256_cmpgt_epi32(i1, below), _mm256_cmpgt_epi32(vsize, i1));
    stride *= size;
  }
}

// Tap `tap` (x fastest) of the axes: offsets summed, inside on every axis, weights multiplied in axis order.
template <int Dims>
ATTNKERNELS_ALWAYS_INLINE void tap_vector_avx2(const AxisVectors8 (&axes)[Dims], int tap,
                                               TapVectors8<Dims>& taps) {
  const int k[3] = {tap & 1, (tap >> 1) & 1, (tap >> 2) & 1};
  __m256i off = axes[0].offset[k[0]];
  __m256i ok = axes[0].inside[k[0]];
  __m256 w = axes[0].weight[k[0]];
  for (int a = 1; a < Dims; ++a) {
    off = _mm256_add_epi32(off, axes[a].offset[k[a]]);
    ok = _mm256_and_si256(ok, axes[a].inside[k[a]]);
    w = _mm256_mul_ps(w, axes[a].weight[k[a]]);
  }
  taps.offset[tap] = off;
  taps.inside[tap] = ok;
  taps.weight[tap] = w;
}

// The taps from normalised coordinates, coords[axis][half]: taps_from_coords_avx512 for two halves.
template <bool border, bool with_dweight, bool with_quads = false, int Dims>
inline void taps_from_coords_avx2(PointTile<float, Dims>& tile, const __m256 (&coords)[Dims][2],
                                  const SamplerShape& s) {
  static_assert(Dims == 2 || Dims == 3, "tiles hold 2-D or 3-D taps");
  const __m256i ones = _mm256_set1_epi32(1);
  for (int h = 0; h < 2; ++h) {
    __m256 half_coords[Dims];
    for (int r = 0; r < Dims; ++r) half_coords[r] = coords[r][h];
    AxisVectors8 axes[Dims];
    axis_vectors_avx2<border>(half_coords, s, axes);
    TapVectors8<Dims> taps;
    for (int tap = 0; tap < PointTile<float, Dims>::kTaps; ++tap) {
      tap_vector_avx2(axes, tap, taps);
      const __m256i ok = taps.inside[tap];
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(tile.offset[tap] + 8 * h), _mm256_and_si256(ok, taps.offset[tap]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(tile.valid[tap] + 8 * h), _mm256_and_si256(ok, ones));
      _mm256_storeu_ps(tile.weight[tap] + 8 * h, taps.weight[tap]);
      if constexpr (with_dweight) {
        // d weight / d coordinate a: that axis's d weight times the other axes' weights, in axis order.
        const int k[3] = {tap & 1, (tap >> 1) & 1, (tap >> 2) & 1};
        for (int a = 0; a < Dims; ++a) {
          __m256 d = axes[a].dweight[k[a]];
          for (int b = 0; b < Dims; ++b) {
            if (b != a) d = _mm256_mul_ps(d, axes[b].weight[k[b]]);
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
        const __m256i x = axes[0].low;
        __m256i ok = _mm256_and_si256(_mm256_cmpgt_epi32(x, below),
                                      _mm256_cmpgt_epi32(_mm256_set1_epi32(int32_t(s.in_size[0])), x));
        __m256i index = _mm256_add_epi32(x, ones);
        int32_t stride = int32_t(s.in_size[0]) + 2;
        for (int a = 1; a < Dims; ++a) {
          const __m256i i = _mm256_add_epi32(axes[a].low, _mm256_set1_epi32((pair >> (a - 1)) & 1));
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
template <int Dims>
ATTNKERNELS_ALWAYS_INLINE void coords_from_theta_avx2(const float* t, const float* bx, float by, float bz,
                                                      __m256 (&coords)[Dims][2]) {
  constexpr int kCols = Dims + 1;
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
}

template <bool border, bool with_dweight, bool with_quads = false, int Dims>
inline void build_avx2(PointTile<float, Dims>& tile, const float* t, const float* bx, float by, float bz,
                       const SamplerShape& s) {
  __m256 coords[Dims][2];
  coords_from_theta_avx2<Dims>(t, bx, by, bz, coords);
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

// The normalised coordinates of the first `count` (1..16) points stored interleaved from `points`,
// coords[axis][half], lanes past `count` 0; false when a coordinate is not finite or beyond kTileReach.
template <int Dims>
ATTNKERNELS_ALWAYS_INLINE bool coords_from_points_avx2(const float* points, int64_t count,
                                                       __m256 (&coords)[Dims][2]) {
  constexpr int L = PointTile<float, Dims>::kLanes;
  float padded[L * Dims];
  if (count < L) {  // lanes past `count` take coordinate 0, as in build_from_points
    std::fill(std::copy(points, points + count * Dims, padded), padded + L * Dims, 0.0f);
    points = padded;
  }
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 reach = _mm256_set1_ps(PointTile<float, Dims>::kTileReach);
  __m256 ok = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
  for (int h = 0; h < 2; ++h) {
    __m256 axes[Dims];
    deinterleave_points_avx2<Dims>(points + 8 * h * Dims, axes);
    for (int a = 0; a < Dims; ++a) {
      coords[a][h] = axes[a];
      ok = _mm256_and_ps(ok, _mm256_cmp_ps(_mm256_and_ps(axes[a], magnitude), reach, _CMP_LE_OQ));  // false for NaN
    }
  }
  return _mm256_movemask_ps(ok) == 0xff;
}

// PointTile::build_from_points() for fp32: the taps of the first `count`
// (1..16) points stored interleaved from `points`; false, with nothing usable
// built, when a coordinate is not finite or beyond kTileReach.
template <bool border, bool with_dweight, bool with_quads = false, int Dims>
inline bool build_from_points_avx2(PointTile<float, Dims>& tile, const float* points, int64_t count,
                                   const SamplerShape& s) {
  __m256 coords[Dims][2];
  if (!coords_from_points_avx2<Dims>(points, count, coords)) return false;
  taps_from_coords_avx2<border, with_dweight, with_quads>(tile, coords, s);
  return true;
}

// The bilinear samples of `channels` input planes (`plane_size` apart from `planes`) at half `h`
// of a tile's first `count` points, its taps in registers: dst[c * dst_stride + 8 h + lane] = the
// sum over taps of weight * value, taps outside the input skipped (as 0). Channels go in groups
// of up to 4, so that each tap's offsets, mask and weights serve a group; each channel sums in
// tap order. `pair_gathers`: x-neighbour taps load as 64-bit pairs (gather_pair_avx2), else each
// tap is one 8-lane gather; the same values either way (pair_gathers_avx2 says which is faster).
template <int Dims>
ATTNKERNELS_ALWAYS_INLINE void sample_vectors_avx2(const TapVectors8<Dims>& taps, const float* planes,
                                                   int64_t plane_size, int64_t channels, float* dst,
                                                   int64_t dst_stride, int h, int64_t count, bool pair_gathers) {
  const bool whole = count >= 8 * (h + 1);
  const __m256i lanes = first_lanes_avx2(count, h);
  auto group = [&](int64_t c0, auto size_tag) ATTNKERNELS_LAMBDA_ALWAYS_INLINE {
    constexpr int K = decltype(size_tag)::value;
    __m256 acc[K];
    for (int k = 0; k < K; ++k) acc[k] = _mm256_setzero_ps();
    for (int tap = 0; tap < TapVectors8<Dims>::kTaps; tap += 2) {  // x-neighbour taps in pairs
      const __m256 in_low = _mm256_castsi256_ps(taps.inside[tap]);
      const __m256 in_high = _mm256_castsi256_ps(taps.inside[tap + 1]);
      for (int k = 0; k < K; ++k) {
        const float* plane = planes + (c0 + k) * plane_size;
        __m256 low, high;
        if (pair_gathers) {
          gather_pair_avx2(plane, taps.inside[tap], taps.inside[tap + 1], taps.offset[tap], taps.offset[tap + 1], low,
                           high);
        } else {
          low = _mm256_mask_i32gather_ps(_mm256_setzero_ps(), plane, taps.offset[tap], in_low, 4);
          high = _mm256_mask_i32gather_ps(_mm256_setzero_ps(), plane, taps.offset[tap + 1], in_high, 4);
        }
        acc[k] = _mm256_add_ps(acc[k], _mm256_and_ps(in_low, _mm256_mul_ps(taps.weight[tap], low)));
        acc[k] = _mm256_add_ps(acc[k], _mm256_and_ps(in_high, _mm256_mul_ps(taps.weight[tap + 1], high)));
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

// The samples at normalised coordinates coords[axis][half] (the first `count` lanes), each half's
// taps in registers.
template <bool border, int Dims>
ATTNKERNELS_ALWAYS_INLINE void sample_coords_avx2(const __m256 (&coords)[Dims][2], const SamplerShape& s,
                                                  const float* planes, int64_t plane_size, int64_t channels,
                                                  float* dst, int64_t dst_stride, int64_t count, bool pair_gathers) {
  for (int h = 0; h < 2 && 8 * h < count; ++h) {
    __m256 half_coords[Dims];
    for (int r = 0; r < Dims; ++r) half_coords[r] = coords[r][h];
    AxisVectors8 axes[Dims];
    axis_vectors_avx2<border>(half_coords, s, axes);
    TapVectors8<Dims> taps;
    for (int tap = 0; tap < TapVectors8<Dims>::kTaps; ++tap) tap_vector_avx2(axes, tap, taps);
    sample_vectors_avx2(taps, planes, plane_size, channels, dst, dst_stride, h, count, pair_gathers);
  }
}

// build_from_points_avx2 and the sampling in one, the taps of each half kept in registers (with one
// or two channels the tile's stores and reloads cost about as much as the samples): the same
// operations, so the same bits. Returns false, sampling nothing, where build_from_points_avx2 does.
template <bool border, int Dims>
inline bool sample_points_avx2(const float* points, int64_t count, const SamplerShape& s, const float* planes,
                               int64_t plane_size, int64_t channels, float* dst, int64_t dst_stride,
                               bool pair_gathers) {
  __m256 coords[Dims][2];
  if (!coords_from_points_avx2<Dims>(points, count, coords)) return false;
  sample_coords_avx2<border>(coords, s, planes, plane_size, channels, dst, dst_stride, count, pair_gathers);
  return true;
}

// build_avx2 and the sampling in one, the taps kept in registers (see sample_points_avx2): the
// first `count` points of the row at base (by, bz) whose base x coordinates are bx[0 .. 16).
template <bool border, int Dims>
inline void sample_row_avx2(const float* t, const float* bx, float by, float bz, const SamplerShape& s,
                            const float* planes, int64_t plane_size, int64_t channels, float* dst,
                            int64_t dst_stride, int64_t count, bool pair_gathers) {
  __m256 coords[Dims][2];
  coords_from_theta_avx2<Dims>(t, bx, by, bz, coords);
  sample_coords_avx2<border>(coords, s, planes, plane_size, channels, dst, dst_stride, count, pair_gathers);
}

// Times sample_points_avx2 with and without pair gathers over a 128 x 128 plane (calibration_grid;
// about a millisecond in all).
inline bool measure_pair_gathers_faster_avx2() {
  constexpr int64_t kSide = 128, kPoints = kSide * kSide;
  const SamplerShape s = calibration_shape(1, 1, kSide);
  const std::vector<float> grid = calibration_grid(1, kSide);
  std::vector<float> plane(kPoints), out(kPoints);
  for (int64_t i = 0; i < kPoints; ++i) plane[i] = float(i % 251) / 251.0f;
  return first_path_faster([&](bool pairs) {
    for (int64_t p = 0; p < kPoints; p += 16) {
      sample_points_avx2<false, 2>(grid.data() + p * 2, 16, s, plane.data(), kPoints, 1, out.data() + p, kPoints,
                                   pairs);
    }
  });
}

// Whether the avx2 tiles' forwards load x-neighbour taps as 64-bit pairs (two 4-lane gathers for 16
// values) or each tap by itself (one 8-lane gather for 8): the pairs were faster where gathers are
// slow (AMD Zen), single taps 1.3x faster on an Intel Xeon, where the pairs' shuffles compete with
// the gathers for one port. Measured once per process (ATTNKERNELS_PAIR_GATHERS=on or off forces it).
inline bool pair_gathers_avx2() {
  return path_taken("ATTNKERNELS_PAIR_GATHERS", [] {
    static const bool faster = measure_pair_gathers_faster_avx2();
    return faster;
  });
}

}  // namespace ATTNKERNELS_CPU_ISA
}  // namespace cpu
}  // namespace attnkernels

#endif  // ATTNKERNELS_TILES_AVX2
