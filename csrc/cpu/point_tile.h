// Taps of a tile of consecutive output points computed as vectors: the
// points-vectorised fused sampler (affine_rows.h) builds them from theta, and
// grid_sample's general loops (sampler_loops.h) from stored grid points.
#pragma once

#include "../cpu_isa.h"
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "../sampler_shape.h"
#include "cpu_kernels.h"

namespace attnkernels {
namespace cpu {
inline namespace ATTNKERNELS_CPU_ISA {  // see cpu_isa.h

// Calls group(c0, std::integral_constant<int, K>{}) for the channels in groups of
// K = kGroup (at most 4) from c0 = 0, then once for those left: the vectorised
// tile loops load a tap's offsets, mask and weights once per group of channels.
template <int kGroup = 4, typename Group>
ATTNKERNELS_ALWAYS_INLINE void for_channel_groups(int64_t channels, Group&& group) {
  static_assert(kGroup >= 1 && kGroup <= 4, "groups of 1 to 4 channels");
  int64_t c0 = 0;
  for (; c0 + kGroup <= channels; c0 += kGroup) group(c0, std::integral_constant<int, kGroup>{});
  const int64_t left = channels - c0;
  if constexpr (kGroup > 3) {
    if (left == 3) return group(c0, std::integral_constant<int, 3>{});
  }
  if constexpr (kGroup > 2) {
    if (left == 2) return group(c0, std::integral_constant<int, 2>{});
  }
  if constexpr (kGroup > 1) {
    if (left == 1) group(c0, std::integral_constant<int, 1>{});
  }
}

// Whether the path `variable` names is taken: forced by it, else `measured()`'s answer (which keeps
// it in a function-local static: measured once per process and variant).
inline bool path_taken(const char* variable, bool (*measured)()) {
  switch (path_choice_from_environment(variable)) {
    case PathChoice::On: return true;
    case PathChoice::Off: return false;
    case PathChoice::Measure: break;
  }
  return measured();
}

// The calibration problem of the measured choices: `batch` items of `channels` side x side fp32 planes
// (zeros padding, corners not aligned), sampled at the same size under a grid rotated by 0.3 rad and
// scaled by 0.9 (N, side, side, 2).
inline SamplerShape calibration_shape(int64_t batch, int64_t channels, int64_t side) {
  SamplerShape s;
  s.batch = batch;
  s.channels = channels;
  s.in_size[0] = s.in_size[1] = s.out_size[0] = s.out_size[1] = side;
  s.in_points = s.out_points = side * side;
  s.padding = Padding::Zeros;
  s.align_corners = false;
  return s;
}

inline std::vector<float> calibration_grid(int64_t batch, int64_t side) {
  std::vector<float> grid(batch * side * side * 2);
  const float turn = 0.3f, scale = 0.9f;
  for (int64_t n = 0; n < batch; ++n) {
    for (int64_t y = 0; y < side; ++y) {
      for (int64_t x = 0; x < side; ++x) {
        const float u = (2.0f * x + 1.0f) / side - 1.0f, v = (2.0f * y + 1.0f) / side - 1.0f;
        float* point = grid.data() + ((n * side + y) * side + x) * 2;
        point[0] = scale * (std::cos(turn) * u - std::sin(turn) * v);
        point[1] = scale * (std::sin(turn) * u + std::cos(turn) * v);
      }
    }
  }
  return grid;
}

// Whether run(true) is faster than run(false): the best of 5 alternating timed runs of each.
template <typename Run>
bool first_path_faster(Run&& run) {
  const auto seconds = [&](bool first) {
    const auto start = std::chrono::steady_clock::now();
    run(first);
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  };
  double best_first = std::numeric_limits<double>::infinity(), best_second = best_first;
  for (int repeat = 0; repeat < 5; ++repeat) {
    best_first = std::min(best_first, seconds(true));
    best_second = std::min(best_second, seconds(false));
  }
  return best_first < best_second;
}

}  // namespace ATTNKERNELS_CPU_ISA
}  // namespace cpu
}  // namespace attnkernels

#include "point_tile_avx2.h"

namespace attnkernels {
namespace cpu {
inline namespace ATTNKERNELS_CPU_ISA {  // see cpu_isa.h

// Taps of one tile of kLanes points: per tap (x fastest, then y, then z) the
// offset within an input plane, the weight, whether it lies inside the input,
// and (for the backward) d weight / d normalised coordinate per axis.
template <typename acc_t, int Dims>
struct PointTile {
  static constexpr int kLanes = 64 / int(sizeof(acc_t));  // one 512-bit vector
  static constexpr int kTaps = 1 << Dims;
  // Largest |normalised coordinate| that build_from_points_avx512 takes: it
  // keeps every tap offset, in range or not, within int32 for inputs of up to
  // kMaxTilePoints points per channel.
  static constexpr float kTileReach = 4.0f;
  static constexpr int64_t kMaxTilePoints = int64_t(1) << 27;
  int32_t offset[kTaps][kLanes];
  acc_t weight[kTaps][kLanes];
  int32_t valid[kTaps][kLanes];  // 1 inside the input, else 0
  acc_t dweight[kTaps][Dims][kLanes];
  // Built only on request (with_quads), for inputs laid out as bordered pixel quads
  // (pixel_quads.h): per pair of x-neighbour taps (2r, 2r + 1), the pixel index of
  // tap 2r in an item's bordered layout, or -1 when both taps lie beyond the border.
  int32_t quad[kTaps / 2][kLanes];

  // Points with base x coordinates bx[0 .. kLanes) in the row at base (by, bz)
  // of the batch item whose theta is `t`. Lanes past the row end compute
  // harmless values that callers ignore.
  // with_quads (fp32 in the vectorised variants only): PointTile::quad as well.
  template <bool border, bool with_dweight, bool with_quads = false>
  void build(const acc_t* t, const acc_t* bx, acc_t by, acc_t bz, const SamplerShape& s) {
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<acc_t, float>) {
      build_avx512<border, with_dweight, with_quads>(t, bx, by, bz, s);
      return;
    }
#elif defined(ATTNKERNELS_TILES_AVX2)
    if constexpr (std::is_same_v<acc_t, float>) {
      build_avx2<border, with_dweight, with_quads>(*this, t, bx, by, bz, s);
      return;
    }
#endif
    constexpr int kCols = Dims + 1;
    acc_t coords[Dims][kLanes];
    for (int r = 0; r < Dims; ++r) {
      const acc_t t0 = t[r * kCols + 0];
      const acc_t t1 = Dims > 1 ? t[r * kCols + 1] : acc_t(0);
      const acc_t t2 = Dims > 2 ? t[r * kCols + 2] : acc_t(0);
      const acc_t shift = t[r * kCols + Dims];
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) {
        // theta @ [x, y, (z,) 1], in AffineCoords::Cursor::load's order.
        acc_t v = shift;
        v += t0 * bx[l];
        if constexpr (Dims > 1) v += t1 * by;
        if constexpr (Dims > 2) v += t2 * bz;
        coords[r][l] = v;
      }
    }
    taps_from_coords<border, with_dweight>(coords, s);
  }

  // Taps of the first `count` (1..kLanes) points whose normalised coordinates
  // are stored interleaved (x, y[, z]) from `points`, in plain loops
  // (build_from_points_avx512 and build_from_points_avx2 in intrinsics; the
  // former documents the contract).
  template <bool border, bool with_dweight>
  bool build_from_points(const acc_t* points, int64_t count, const SamplerShape& s) {
    acc_t coords[Dims][kLanes];
    bool ok = true;
    for (int l = 0; l < kLanes; ++l) {
      for (int a = 0; a < Dims; ++a) {
        const acc_t c = l < count ? points[l * Dims + a] : acc_t(0);
        coords[a][l] = c;
        ok = ok && std::abs(c) <= acc_t(kTileReach);  // false for NaN
      }
    }
    if (!ok) return false;
    taps_from_coords<border, with_dweight>(coords, s);
    return true;
  }

  // acc[lane] = the bilinear sample of one input plane at the tile's points: the
  // sum over taps of weight * value, taps outside the input skipped (plain loops;
  // sample_vectors_avx512 and sample_vectors_avx2 in intrinsics).
  template <typename scalar_t>
  void sample(const scalar_t* plane, acc_t* acc) const {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) acc[l] = acc_t(0);
    for (int tap = 0; tap < kTaps; ++tap) {
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) {
        const acc_t value = static_cast<acc_t>(plane[offset[tap][l]]);
        acc[l] += valid[tap][l] ? weight[tap][l] * value : acc_t(0);
      }
    }
  }

  // The taps from normalised coordinates, in plain loops: taps_from_coords_avx512's operations in its order.
  template <bool border, bool with_dweight>
  void taps_from_coords(const acc_t (&coords)[Dims][kLanes], const SamplerShape& s) {
    // Per axis: the low and high tap's offset, weight, d weight, and whether it is inside (1) or not (0).
    int32_t offset_of[Dims][2][kLanes];
    acc_t weight_of[Dims][2][kLanes];
    acc_t dweight_of[Dims][2][kLanes];
    int32_t inside_of[Dims][2][kLanes];
    int32_t stride = 1;
    for (int r = 0; r < Dims; ++r) {
      const int32_t size = int32_t(s.in_size[r]);
      const acc_t fsize = acc_t(size);
      const acc_t last = acc_t(size - 1);
      const acc_t scale = s.align_corners ? last / acc_t(2) : fsize / acc_t(2);
      // unnormalize() as a * (v + 1) - b: align_corners: (v + 1) / 2 * last; else ((v + 1) * size - 1) / 2.
      const bool align = s.align_corners;
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) {
        const acc_t v = coords[r][l];
        const acc_t aligned = (v + acc_t(1)) / acc_t(2) * last;
        const acc_t unaligned = ((v + acc_t(1)) * fsize - acc_t(1)) / acc_t(2);
        acc_t x = align ? aligned : unaligned;
        acc_t slope = scale;
        if constexpr (border) {
          const bool inside = x > acc_t(0) && x < last;
          slope = inside ? scale : acc_t(0);
          const acc_t clipped = x <= acc_t(0) ? acc_t(0) : last;
          x = inside ? x : clipped;
        }
        const acc_t x0 = std::floor(x);
        const int32_t i0 = static_cast<int32_t>(x0);
        const acc_t frac = x - x0;
        offset_of[r][0][l] = i0 * stride;
        offset_of[r][1][l] = (i0 + 1) * stride;
        weight_of[r][0][l] = acc_t(1) - frac;
        weight_of[r][1][l] = frac;
        dweight_of[r][0][l] = -slope;
        dweight_of[r][1][l] = slope;
        inside_of[r][0][l] = (i0 >= 0) & (i0 < size);
        inside_of[r][1][l] = (i0 + 1 >= 0) & (i0 + 1 < size);
      }
      stride *= size;
    }
    for (int tap = 0; tap < kTaps; ++tap) {
      const int kx = tap & 1, ky = (tap >> 1) & 1, kz = (tap >> 2) & 1;
      const int32_t* ox = offset_of[0][kx];
      const int32_t* oy = offset_of[Dims > 1 ? 1 : 0][ky];
      const int32_t* oz = offset_of[Dims > 2 ? 2 : 0][kz];
      const acc_t* wx = weight_of[0][kx];
      const acc_t* wy = weight_of[Dims > 1 ? 1 : 0][ky];
      const acc_t* wz = weight_of[Dims > 2 ? 2 : 0][kz];
      const int32_t* vx = inside_of[0][kx];
      const int32_t* vy = inside_of[Dims > 1 ? 1 : 0][ky];
      const int32_t* vz = inside_of[Dims > 2 ? 2 : 0][kz];
      int32_t* out_offset = offset[tap];
      int32_t* out_valid = valid[tap];
      acc_t* out_weight = weight[tap];
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) {
        int32_t off = ox[l];
        int32_t ok = vx[l];
        acc_t w = wx[l];
        if constexpr (Dims > 1) {
          off += oy[l];
          ok &= vy[l];
          w *= wy[l];
        }
        if constexpr (Dims > 2) {
          off += oz[l];
          ok &= vz[l];
          w *= wz[l];
        }
        out_offset[l] = ok ? off : 0;
        out_valid[l] = ok;
        out_weight[l] = w;
      }
      if constexpr (with_dweight) {
        // d weight / d coordinate a: that axis's d weight times the other axes' weights, in axis order.
        const acc_t* dx = dweight_of[0][kx];
        const acc_t* dy = dweight_of[Dims > 1 ? 1 : 0][ky];
        const acc_t* dz = dweight_of[Dims > 2 ? 2 : 0][kz];
#pragma omp simd
        for (int l = 0; l < kLanes; ++l) {
          if constexpr (Dims == 2) {
            dweight[tap][0][l] = dx[l] * wy[l];
            dweight[tap][1][l] = dy[l] * wx[l];
          } else {
            dweight[tap][0][l] = dx[l] * wy[l] * wz[l];
            dweight[tap][1][l] = dy[l] * wx[l] * wz[l];
            dweight[tap][2][l] = dz[l] * wx[l] * wy[l];
          }
        }
      }
    }
  }

#if defined(__AVX512F__)
  // build() for fp32 in AVX-512 intrinsics (the compiler leaves the generic
  // loops above partly scalar). Same operations in the same order.
  template <bool border, bool with_dweight, bool with_quads = false>
  void build_avx512(const float* t, const float* bx, float by, float bz, const SamplerShape& s) {
    __m512 coords[Dims];
    coords_from_theta_avx512(t, bx, by, bz, coords);
    taps_from_coords_avx512<border, with_dweight, with_quads>(coords, s);
  }

  // theta @ [x, y, (z,) 1] for the points with base x coordinates bx[0 .. kLanes) in the row at
  // base (by, bz): the normalised coordinates, one vector per axis.
  ATTNKERNELS_ALWAYS_INLINE static void coords_from_theta_avx512(const float* t, const float* bx, float by, float bz,
                                                                 __m512 (&coords)[Dims]) {
    constexpr int kCols = Dims + 1;
    const __m512 base_x = _mm512_loadu_ps(bx);
    for (int r = 0; r < Dims; ++r) {
      __m512 v = _mm512_add_ps(_mm512_set1_ps(t[r * kCols + Dims]), _mm512_mul_ps(_mm512_set1_ps(t[r * kCols]), base_x));
      if constexpr (Dims > 1) v = _mm512_add_ps(v, _mm512_set1_ps(t[r * kCols + 1] * by));
      if constexpr (Dims > 2) v = _mm512_add_ps(v, _mm512_set1_ps(t[r * kCols + 2] * bz));
      coords[r] = v;
    }
  }

  // build_avx512 and the sampling in one, the taps kept in registers (see sample_points_avx512):
  // the first `count` points of the row.
  template <bool border>
  static void sample_row_avx512(const float* t, const float* bx, float by, float bz, const SamplerShape& s,
                                const float* planes, int64_t plane_size, int64_t channels, float* dst,
                                int64_t dst_stride, int64_t count) {
    __m512 coords[Dims];
    coords_from_theta_avx512(t, bx, by, bz, coords);
    sample_coords_avx512<border>(coords, s, planes, plane_size, channels, dst, dst_stride, count);
  }

  // The samples at normalised coordinates (one vector per axis), the taps in registers.
  template <bool border>
  ATTNKERNELS_ALWAYS_INLINE static void sample_coords_avx512(const __m512 (&coords)[Dims], const SamplerShape& s,
                                                             const float* planes, int64_t plane_size,
                                                             int64_t channels, float* dst, int64_t dst_stride,
                                                             int64_t count) {
    AxisVectors axes[Dims];
    axis_vectors_avx512<border>(coords, s, axes);
    TapVectors taps;
    for (int tap = 0; tap < kTaps; ++tap) tap_vector_avx512(axes, tap, taps);
    sample_vectors_avx512(taps, planes, plane_size, channels, dst, dst_stride, count);
  }

  // The normalised coordinates of the first `count` (1..kLanes) points stored interleaved
  // (x, y[, z]) from `points` (a grid_sample grid), one vector per axis, zero past `count`.
  // Returns false when a coordinate is not finite or beyond kTileReach: the per-point path
  // decides those (torch's NaN rules).
  ATTNKERNELS_ALWAYS_INLINE static bool coords_from_points_avx512(const float* points, int64_t count,
                                                                  __m512 (&coords)[Dims]) {
    const __mmask16 lanes = __mmask16((1u << count) - 1u);
    // The count * Dims values as Dims contiguous (masked) loads, zero past the end; each axis is
    // then permuted out of them (two gathers per tile cost more than the whole rest of the build).
    __m512 stored[Dims];
    for (int v = 0; v < Dims; ++v) {
      const int64_t left = std::max<int64_t>(0, std::min<int64_t>(16, count * Dims - 16 * v));
      stored[v] = _mm512_maskz_loadu_ps(__mmask16((1u << left) - 1u), points + 16 * v);
    }
    const __m512i first = _mm512_mullo_epi32(
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32(Dims));
    const __m512 reach = _mm512_set1_ps(kTileReach);
    __mmask16 ok = lanes;
    for (int a = 0; a < Dims; ++a) {
      const __m512i index = _mm512_add_epi32(first, _mm512_set1_epi32(a));  // of lane l's value: l * Dims + a
      coords[a] = _mm512_maskz_permutex2var_ps(lanes, stored[0], index, stored[1]);  // indices below 32
      if constexpr (Dims == 3) {
        const __mmask16 third = _mm512_cmpge_epi32_mask(index, _mm512_set1_epi32(32));
        coords[a] = _mm512_mask_permutexvar_ps(coords[a], third & lanes, index, stored[2]);  // index mod 16
      }
      ok &= _mm512_cmp_ps_mask(_mm512_abs_ps(coords[a]), reach, _CMP_LE_OQ);  // false for NaN
    }
    return ok == lanes;
  }

  // Taps of the first `count` (1..kLanes) points whose normalised coordinates
  // are stored interleaved (x, y[, z]) from `points` (a grid_sample grid).
  // Returns false, with nothing usable built, when coords_from_points_avx512 does.
  template <bool border, bool with_dweight, bool with_quads = false>
  bool build_from_points_avx512(const float* points, int64_t count, const SamplerShape& s) {
    __m512 coords[Dims];
    if (!coords_from_points_avx512(points, count, coords)) return false;
    taps_from_coords_avx512<border, with_dweight, with_quads>(coords, s);
    return true;
  }

  // build_from_points_avx512 and the sampling in one, the taps kept in registers (with one or two
  // channels the tile's stores and reloads cost about as much as the samples): the same operations,
  // so the same bits. Returns false, sampling nothing, where build_from_points_avx512 does.
  template <bool border>
  static bool sample_points_avx512(const float* points, int64_t count, const SamplerShape& s, const float* planes,
                                   int64_t plane_size, int64_t channels, float* dst, int64_t dst_stride) {
    __m512 coords[Dims];
    if (!coords_from_points_avx512(points, count, coords)) return false;
    sample_coords_avx512<border>(coords, s, planes, plane_size, channels, dst, dst_stride, count);
    return true;
  }

  // Lanes whose tap `tap` lies inside the input.
  ATTNKERNELS_ALWAYS_INLINE __mmask16 inside_avx512(int tap) const {
    const __m512i inside = _mm512_loadu_si512(valid[tap]);
    return _mm512_test_epi32_mask(inside, inside);
  }

  // The values of one input plane at a tap (`in_low` the lanes where it is inside, `off_low` their
  // offsets) and at its neighbour along x (offset + 1 where both are inside; `in_high`, `off_high`):
  // 0 where a tap is outside. Lanes with both taps inside load them as one 64-bit pair (two 8-lane
  // gathers for 32 values instead of two 16-lane ones); lanes with one of them inside gather it
  // alone. No lane reads outside the input.
  ATTNKERNELS_ALWAYS_INLINE static void gather_pair_avx512(const float* plane, __mmask16 in_low, __mmask16 in_high,
                                                           __m512i off_low, __m512i off_high, __m512& low,
                                                           __m512& high) {
    const __mmask16 both = in_low & in_high;
    const __m512i first8 = _mm512_mask_i32gather_epi64(_mm512_setzero_si512(), __mmask8(both),
                                                       _mm512_castsi512_si256(off_low), plane, 4);
    const __m512i last8 = _mm512_mask_i32gather_epi64(_mm512_setzero_si512(), __mmask8(both >> 8),
                                                      _mm512_extracti32x8_epi32(off_low, 1), plane, 4);
    const __m512i evens = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odds = _mm512_add_epi32(evens, _mm512_set1_epi32(1));
    low = _mm512_castsi512_ps(_mm512_permutex2var_epi32(first8, evens, last8));
    high = _mm512_castsi512_ps(_mm512_permutex2var_epi32(first8, odds, last8));
    const __mmask16 low_alone = in_low & ~both, high_alone = in_high & ~both;
    if (low_alone != 0) low = _mm512_mask_i32gather_ps(low, low_alone, off_low, plane, 4);
    if (high_alone != 0) high = _mm512_mask_i32gather_ps(high, high_alone, off_high, plane, 4);
  }

  // gather_pair_avx512 for the tile's taps `tap` (even) and tap + 1.
  ATTNKERNELS_ALWAYS_INLINE void gather_pair_avx512(const float* plane, int tap, __m512& low, __m512& high) const {
    gather_pair_avx512(plane, inside_avx512(tap), inside_avx512(tap + 1), _mm512_loadu_si512(offset[tap]),
                       _mm512_loadu_si512(offset[tap + 1]), low, high);
  }

  // Per tap: the offset within an input plane (any value where the tap is outside), the lanes
  // where it is inside, the weight.
  struct TapVectors {
    __m512i offset[kTaps];
    __mmask16 inside[kTaps];
    __m512 weight[kTaps];
  };

  // The bilinear samples of `channels` input planes (`plane_size` apart from `planes`) at the
  // first `count` points of taps in registers: dst[c * dst_stride + lane] = the sum over taps of
  // weight * value, taps outside the input skipped (taken as 0). Channels go in groups of up to 4,
  // so that each tap's offsets, mask and weights serve a group; each channel sums in tap order.
  ATTNKERNELS_ALWAYS_INLINE static void sample_vectors_avx512(const TapVectors& taps, const float* planes,
                                                              int64_t plane_size, int64_t channels, float* dst,
                                                              int64_t dst_stride, int64_t count) {
    const __mmask16 lanes = __mmask16((1u << count) - 1u);
    auto group = [&](int64_t c0, auto size_tag) ATTNKERNELS_LAMBDA_ALWAYS_INLINE {
      constexpr int K = decltype(size_tag)::value;
      __m512 acc[K];
      for (int k = 0; k < K; ++k) acc[k] = _mm512_setzero_ps();
      for (int tap = 0; tap < kTaps; tap += 2) {  // x-neighbour taps in pairs
        const __mmask16 in_low = taps.inside[tap], in_high = taps.inside[tap + 1];
        for (int k = 0; k < K; ++k) {
          __m512 low, high;
          gather_pair_avx512(planes + (c0 + k) * plane_size, in_low, in_high, taps.offset[tap], taps.offset[tap + 1],
                             low, high);
          acc[k] = _mm512_add_ps(acc[k], _mm512_maskz_mul_ps(in_low, taps.weight[tap], low));
          acc[k] = _mm512_add_ps(acc[k], _mm512_maskz_mul_ps(in_high, taps.weight[tap + 1], high));
        }
      }
      for (int k = 0; k < K; ++k) {
        // A whole tile stores unmasked (masked stores are slow on some CPUs, e.g. AMD's).
        if (count == kLanes) _mm512_storeu_ps(dst + (c0 + k) * dst_stride, acc[k]);
        else _mm512_mask_storeu_ps(dst + (c0 + k) * dst_stride, lanes, acc[k]);
      }
    };
    for_channel_groups(channels, group);
  }

  // Per axis: the low tap's index, and for the low and high tap the offset, weight, d weight and
  // the lanes where it is inside.
  struct AxisVectors {
    __m512i low;
    __m512i offset[2];
    __m512 weight[2];
    __m512 dweight[2];
    __mmask16 inside[2];
  };

  // The AxisVectors of normalised coordinates (one vector per axis).
  template <bool border>
  ATTNKERNELS_ALWAYS_INLINE static void axis_vectors_avx512(const __m512* coords, const SamplerShape& s,
                                                            AxisVectors (&axes)[Dims]) {
    const __m512 one = _mm512_set1_ps(1.0f);
    const __m512 two = _mm512_set1_ps(2.0f);
    const __m512 zero = _mm512_setzero_ps();
    int32_t stride = 1;
    for (int r = 0; r < Dims; ++r) {
      const int32_t size = int32_t(s.in_size[r]);
      const float last = float(size - 1);
      const float scale = s.align_corners ? last / 2.0f : float(size) / 2.0f;
      const __m512 v = coords[r];
      const __m512 vlast = _mm512_set1_ps(last);
      __m512 x = s.align_corners
                     ? _mm512_mul_ps(_mm512_div_ps(_mm512_add_ps(v, one), two), vlast)
                     : _mm512_div_ps(_mm512_sub_ps(_mm512_mul_ps(_mm512_add_ps(v, one), _mm512_set1_ps(float(size))), one),
                                     two);
      __m512 slope = _mm512_set1_ps(scale);
      if constexpr (border) {
        const __mmask16 inside = _mm512_cmp_ps_mask(x, zero, _CMP_GT_OQ) & _mm512_cmp_ps_mask(x, vlast, _CMP_LT_OQ);
        const __mmask16 low = _mm512_cmp_ps_mask(x, zero, _CMP_LE_OQ);
        const __m512 clipped = _mm512_mask_blend_ps(low, vlast, zero);
        x = _mm512_mask_blend_ps(inside, clipped, x);
        slope = _mm512_maskz_mov_ps(inside, slope);
      }
      const __m512 x0 = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
      const __m512i i0 = _mm512_cvttps_epi32(x0);
      const __m512i i1 = _mm512_add_epi32(i0, _mm512_set1_epi32(1));
      const __m512 frac = _mm512_sub_ps(x, x0);
      const __m512i vsize = _mm512_set1_epi32(size);
      const __m512i vzero = _mm512_setzero_si512();
      const __m512i vstride = _mm512_set1_epi32(stride);
      AxisVectors& axis = axes[r];
      axis.low = i0;
      axis.offset[0] = _mm512_mullo_epi32(i0, vstride);
      axis.offset[1] = _mm512_mullo_epi32(i1, vstride);
      axis.weight[0] = _mm512_sub_ps(one, frac);
      axis.weight[1] = frac;
      axis.dweight[0] = _mm512_castsi512_ps(
          _mm512_xor_si512(_mm512_castps_si512(slope), _mm512_set1_epi32(int32_t(0x80000000u))));  // -slope
      axis.dweight[1] = slope;
      axis.inside[0] = _mm512_cmpge_epi32_mask(i0, vzero) & _mm512_cmplt_epi32_mask(i0, vsize);
      axis.inside[1] = _mm512_cmpge_epi32_mask(i1, vzero) & _mm512_cmplt_epi32_mask(i1, vsize);
      stride *= size;
    }
  }

  // Tap `tap` (x fastest) of the axes: offsets summed, inside on every axis, weights multiplied in axis order.
  ATTNKERNELS_ALWAYS_INLINE static void tap_vector_avx512(const AxisVectors (&axes)[Dims], int tap, TapVectors& taps) {
    const int k[3] = {tap & 1, (tap >> 1) & 1, (tap >> 2) & 1};
    __m512i off = axes[0].offset[k[0]];
    __mmask16 ok = axes[0].inside[k[0]];
    __m512 w = axes[0].weight[k[0]];
    for (int a = 1; a < Dims; ++a) {
      off = _mm512_add_epi32(off, axes[a].offset[k[a]]);
      ok &= axes[a].inside[k[a]];
      w = _mm512_mul_ps(w, axes[a].weight[k[a]]);
    }
    taps.offset[tap] = off;
    taps.inside[tap] = ok;
    taps.weight[tap] = w;
  }

  // The taps from normalised coordinates (one vector per axis), stored in the tile.
  template <bool border, bool with_dweight, bool with_quads = false>
  void taps_from_coords_avx512(const __m512* coords, const SamplerShape& s) {
    AxisVectors axes[Dims];
    axis_vectors_avx512<border>(coords, s, axes);
    const __m512i ones = _mm512_set1_epi32(1);
    TapVectors taps;
    for (int tap = 0; tap < kTaps; ++tap) {
      tap_vector_avx512(axes, tap, taps);
      const __mmask16 ok = taps.inside[tap];
      _mm512_storeu_si512(offset[tap], _mm512_maskz_mov_epi32(ok, taps.offset[tap]));
      _mm512_storeu_si512(valid[tap], _mm512_maskz_mov_epi32(ok, ones));
      _mm512_storeu_ps(weight[tap], taps.weight[tap]);
      if constexpr (with_dweight) {
        const int k[3] = {tap & 1, (tap >> 1) & 1, (tap >> 2) & 1};
        for (int a = 0; a < Dims; ++a) {
          __m512 d = axes[a].dweight[k[a]];
          for (int b = 0; b < Dims; ++b) {
            if (b != a) d = _mm512_mul_ps(d, axes[b].weight[k[b]]);
          }
          _mm512_storeu_ps(dweight[tap][a], d);
        }
      }
    }
    if constexpr (with_quads) {
      // Bordered indices run from -1 to size on every axis (x: the pair's low tap up to size - 1).
      for (int pair = 0; pair < kTaps / 2; ++pair) {
        const __m512i x = axes[0].low;
        __mmask16 ok = _mm512_cmpge_epi32_mask(x, _mm512_set1_epi32(-1)) &
                       _mm512_cmplt_epi32_mask(x, _mm512_set1_epi32(int32_t(s.in_size[0])));
        __m512i index = _mm512_add_epi32(x, _mm512_set1_epi32(1));
        int32_t stride = int32_t(s.in_size[0]) + 2;
        for (int a = 1; a < Dims; ++a) {
          const __m512i i = _mm512_add_epi32(axes[a].low, _mm512_set1_epi32((pair >> (a - 1)) & 1));
          ok &= _mm512_cmpge_epi32_mask(i, _mm512_set1_epi32(-1)) &
                _mm512_cmple_epi32_mask(i, _mm512_set1_epi32(int32_t(s.in_size[a])));
          index = _mm512_add_epi32(index, _mm512_mullo_epi32(_mm512_add_epi32(i, ones), _mm512_set1_epi32(stride)));
          stride *= int32_t(s.in_size[a]) + 2;
        }
        _mm512_storeu_si512(quad[pair], _mm512_mask_mov_epi32(_mm512_set1_epi32(-1), ok, index));
      }
    }
  }
#endif
};

}  // namespace ATTNKERNELS_CPU_ISA
}  // namespace cpu
}  // namespace attnkernels
