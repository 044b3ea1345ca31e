// The point tiles of grid_sample (planar_sampler.h) and of the fused
// affine_grid_sample (affine_rows.h) for 3 or 4 fp32 channels, with the input
// interleaved as pixel quads: each input position's channels as 4
// consecutive floats (zero-filled past C), with one position of zeros around
// every side of the volume ("bordered"). A tap pair (x-neighbours, 8 floats)
// is then one 32-byte load per point for all channels, where the planar
// layout needs a gather per channel and pair. Gathers ran at ~4 ns per 8
// 64-bit elements here (AMD Zen 5, L1-resident), so with RGB inputs the
// gathers were ~2/3 of the planar forward.
//
// The border holds the taps that lie one position outside (weight * 0 = +0,
// what the planar tiles add for an outside tap); a pair of taps further out
// reads a block of zeros instead (PointTile::quad is -1 there). So every
// point gets the planar tiles' sums in the same order, bit for bit.
#pragma once

#include "../cpu_isa.h"
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "channels_last_layout.h"
#include "point_tile.h"

namespace attnkernels {
namespace cpu {
inline namespace ATTNKERNELS_CPU_ISA {  // see cpu_isa.h

constexpr int64_t kQuad = 4;  // floats per bordered position

// Positions of one item's bordered layout: (size + 2) along each of the Dims axes.
template <int Dims>
inline int64_t bordered_points(const SamplerShape& s) {
  int64_t points = 1;
  for (int a = 0; a < Dims; ++a) points *= s.in_size[a] + 2;
  return points;
}

// Whether the quad layout serves these arguments (on top of the caller's own conditions
// for its tiles): 3 or 4 channels (fewer would waste most of each quad), a vectorised variant, and bordered
// indices within PointTile::quad's int32.
template <int Dims>
inline bool quads_apply(const SamplerShape& s) {
#if defined(__AVX512F__) || defined(__AVX2__)
  return (s.channels == 3 || s.channels == 4) && bordered_points<Dims>(s) < std::numeric_limits<int32_t>::max();
#else
  (void)s;
  return false;
#endif
}

// The bordered position of input position `offset` (flattened, x fastest).
template <int Dims>
inline int64_t bordered_index(const SamplerShape& s, int64_t offset) {
  int64_t index = 0, stride = 1;
  for (int a = 0; a < Dims; ++a) {
    index += (offset % s.in_size[a] + 1) * stride;
    offset /= s.in_size[a];
    stride *= s.in_size[a] + 2;
  }
  return index;
}

// Floats of the quad buffer for `s`: every item's bordered positions, then 2 positions of zeros
// (the pair that taps beyond the border read).
template <int Dims>
inline int64_t quad_buffer_size(const SamplerShape& s) {
  return (s.batch * bordered_points<Dims>(s) + 2) * kQuad;
}

// The pair of zero positions after the last item.
template <int Dims>
inline const float* quad_zeros(const float* quads, const SamplerShape& s) {
  return quads + s.batch * bordered_points<Dims>(s) * kQuad;
}

// Writes `count` positions of channels `planes[c][i]` (c < C, `plane` apart) interleaved into
// out[i * 4 + c], zeros for c >= C.
inline void interleave_row(const float* planes, int64_t plane, int64_t C, int64_t count, float* out) {
  int64_t i = 0;
#if defined(__AVX512F__)
  // 16 positions: the C rows as 4 vectors, transposed to 4 vectors of 4 positions x 4 channels.
  const __m512i low_pairs = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i high_pairs = _mm512_add_epi32(low_pairs, _mm512_set1_epi32(8));
  for (; i + 16 <= count; i += 16) {
    const __m512 c0 = _mm512_loadu_ps(planes + i), c1 = _mm512_loadu_ps(planes + plane + i);
    const __m512 c2 = _mm512_loadu_ps(planes + 2 * plane + i);
    const __m512 c3 = C == 4 ? _mm512_loadu_ps(planes + 3 * plane + i) : _mm512_setzero_ps();
    // (c0, c1) and (c2, c3) interleaved per position: pairs of positions 0-7 and 8-15.
    const __m512 a_low = _mm512_permutex2var_ps(c0, low_pairs, c1), a_high = _mm512_permutex2var_ps(c0, high_pairs, c1);
    const __m512 b_low = _mm512_permutex2var_ps(c2, low_pairs, c3), b_high = _mm512_permutex2var_ps(c2, high_pairs, c3);
    // 64-bit words: position p's (c0, c1) from a, (c2, c3) from b.
    const __m512i words_low = _mm512_set_epi64(11, 3, 10, 2, 9, 1, 8, 0);
    const __m512i words_high = _mm512_add_epi64(words_low, _mm512_set1_epi64(4));
    const __m512d al = _mm512_castps_pd(a_low), bl = _mm512_castps_pd(b_low);
    const __m512d ah = _mm512_castps_pd(a_high), bh = _mm512_castps_pd(b_high);
    _mm512_storeu_ps(out + i * 4, _mm512_castpd_ps(_mm512_permutex2var_pd(al, words_low, bl)));
    _mm512_storeu_ps(out + i * 4 + 16, _mm512_castpd_ps(_mm512_permutex2var_pd(al, words_high, bl)));
    _mm512_storeu_ps(out + i * 4 + 32, _mm512_castpd_ps(_mm512_permutex2var_pd(ah, words_low, bh)));
    _mm512_storeu_ps(out + i * 4 + 48, _mm512_castpd_ps(_mm512_permutex2var_pd(ah, words_high, bh)));
  }
#elif defined(__AVX2__)
  // 8 positions: unpacks give (c0, c1) and (c2, c3) pairs, then 128-bit halves put in order.
  for (; i + 8 <= count; i += 8) {
    const __m256 c0 = _mm256_loadu_ps(planes + i), c1 = _mm256_loadu_ps(planes + plane + i);
    const __m256 c2 = _mm256_loadu_ps(planes + 2 * plane + i);
    const __m256 c3 = C == 4 ? _mm256_loadu_ps(planes + 3 * plane + i) : _mm256_setzero_ps();
    const __m256 a_low = _mm256_unpacklo_ps(c0, c1), a_high = _mm256_unpackhi_ps(c0, c1);  // positions 0,1,4,5 / 2,3,6,7
    const __m256 b_low = _mm256_unpacklo_ps(c2, c3), b_high = _mm256_unpackhi_ps(c2, c3);
    const __m256 q04 = _mm256_shuffle_ps(a_low, b_low, _MM_SHUFFLE(1, 0, 1, 0));  // positions 0 | 4
    const __m256 q15 = _mm256_shuffle_ps(a_low, b_low, _MM_SHUFFLE(3, 2, 3, 2));  // 1 | 5
    const __m256 q26 = _mm256_shuffle_ps(a_high, b_high, _MM_SHUFFLE(1, 0, 1, 0));  // 2 | 6
    const __m256 q37 = _mm256_shuffle_ps(a_high, b_high, _MM_SHUFFLE(3, 2, 3, 2));  // 3 | 7
    _mm256_storeu_ps(out + i * 4, _mm256_permute2f128_ps(q04, q15, 0x20));
    _mm256_storeu_ps(out + i * 4 + 8, _mm256_permute2f128_ps(q26, q37, 0x20));
    _mm256_storeu_ps(out + i * 4 + 16, _mm256_permute2f128_ps(q04, q15, 0x31));
    _mm256_storeu_ps(out + i * 4 + 24, _mm256_permute2f128_ps(q26, q37, 0x31));
  }
#endif
  for (; i < count; ++i) {
    for (int64_t c = 0; c < kQuad; ++c) out[i * kQuad + c] = c < C ? planes[c * plane + i] : 0.0f;
  }
}

// input (N, C, [D,] H, W) contiguous fp32, C = 3 or 4 -> quads (quad_buffer_size floats).
template <int Dims>
void pack_quads(const SamplerShape& s, const float* input, float* quads) {
  const int64_t width = s.in_size[0];
  const int64_t row = (width + 2) * kQuad;  // floats of a bordered row
  int64_t rows_per_item = 1;                // bordered rows (all axes but x)
  for (int a = 1; a < Dims; ++a) rows_per_item *= s.in_size[a] + 2;
  at::parallel_for(0, s.batch * rows_per_item, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / rows_per_item;
      float* out = quads + r * row;
      // The bordered row's position along each outer axis; inside the input or not.
      int64_t rest = r - n * rows_per_item, source_row = 0, source_stride = 1;
      bool inside = true;
      for (int a = 1; a < Dims; ++a) {
        const int64_t i = rest % (s.in_size[a] + 2) - 1;
        rest /= s.in_size[a] + 2;
        inside = inside && i >= 0 && i < s.in_size[a];
        source_row += i * source_stride;
        source_stride *= s.in_size[a];
      }
      if (!inside) {
        std::fill(out, out + row, 0.0f);
        continue;
      }
      std::fill(out, out + kQuad, 0.0f);
      std::fill(out + row - kQuad, out + row, 0.0f);
      interleave_row(input + n * s.channels * s.in_points + source_row * width, s.in_points, s.channels, width,
                     out + kQuad);
    }
  });
  std::fill(quads + s.batch * rows_per_item * row, quads + quad_buffer_size<Dims>(s), 0.0f);
}

// The quads of `planar` (contiguous fp32, quads_apply<Dims>) in a new tensor.
template <int Dims>
at::Tensor packed_quads(const SamplerShape& s, const at::Tensor& planar) {
  at::Tensor quads = at::empty({quad_buffer_size<Dims>(s)}, planar.options());
  pack_quads<Dims>(s, planar.const_data_ptr<float>(), quads.mutable_data_ptr<float>());
  return quads;
}

#if defined(__AVX512F__)
// 16 points' quads (quads[g]: points 4g .. 4g + 3, 4 channels each) as 4 vectors of one channel.
ATTNKERNELS_ALWAYS_INLINE void quads_to_channels(const __m512 (&quads)[4], __m512 (&channels)[4]) {
  // Channels 0/1 and 2/3 of points 0-7 and of points 8-15, then the halves joined.
  const __m512i even = _mm512_set_epi32(29, 25, 21, 17, 13, 9, 5, 1, 28, 24, 20, 16, 12, 8, 4, 0);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(2));
  const __m512 c01_first = _mm512_permutex2var_ps(quads[0], even, quads[1]);  // c0 of points 0-7, c1 of 0-7
  const __m512 c23_first = _mm512_permutex2var_ps(quads[0], odd, quads[1]);
  const __m512 c01_second = _mm512_permutex2var_ps(quads[2], even, quads[3]);
  const __m512 c23_second = _mm512_permutex2var_ps(quads[2], odd, quads[3]);
  channels[0] = _mm512_shuffle_f32x4(c01_first, c01_second, _MM_SHUFFLE(1, 0, 1, 0));
  channels[1] = _mm512_shuffle_f32x4(c01_first, c01_second, _MM_SHUFFLE(3, 2, 3, 2));
  channels[2] = _mm512_shuffle_f32x4(c23_first, c23_second, _MM_SHUFFLE(1, 0, 1, 0));
  channels[3] = _mm512_shuffle_f32x4(c23_first, c23_second, _MM_SHUFFLE(3, 2, 3, 2));
}
#elif defined(ATTNKERNELS_TILES_AVX2)
// 8 points' quads (quads[g]: points 2g, 2g + 1, 4 channels each) as 4 vectors of one channel.
ATTNKERNELS_ALWAYS_INLINE void quads_to_channels(const __m256 (&quads)[4], __m256 (&channels)[4]) {
  const __m256 t0 = _mm256_unpacklo_ps(quads[0], quads[1]);  // p0c0 p2c0 p0c1 p2c1 | p1c0 p3c0 p1c1 p3c1
  const __m256 t1 = _mm256_unpackhi_ps(quads[0], quads[1]);  // channels 2, 3
  const __m256 t2 = _mm256_unpacklo_ps(quads[2], quads[3]);  // points 4-7
  const __m256 t3 = _mm256_unpackhi_ps(quads[2], quads[3]);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // p0 p2 p4 p6 | p1 p3 p5 p7 -> p0 .. p7
  channels[0] = _mm256_permutevar8x32_ps(_mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0)), order);
  channels[1] = _mm256_permutevar8x32_ps(_mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2)), order);
  channels[2] = _mm256_permutevar8x32_ps(_mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0)), order);
  channels[3] = _mm256_permutevar8x32_ps(_mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2)), order);
}
#endif

#if defined(__AVX512F__)
// Points 4g .. 4g + 3 of the tile at tap pair `pair`: `low` their low taps' quads, `high` the high ones'.
template <int Dims>
ATTNKERNELS_ALWAYS_INLINE void load_pair_quads(const PointTile<float, Dims>& tile, int pair, int g,
                                               const float* item_quads, const float* zeros, __m512& low,
                                               __m512& high) {
  const float* at[4];
  for (int j = 0; j < 4; ++j) {
    const int32_t q = tile.quad[pair][4 * g + j];
    at[j] = q >= 0 ? item_quads + int64_t(q) * kQuad : zeros;
  }
  // Point j's 8 floats: its low tap's 4 channels, then its high tap's.
  const __m512 a = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_loadu_ps(at[0])), _mm256_loadu_ps(at[1]), 1);
  const __m512 b = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_loadu_ps(at[2])), _mm256_loadu_ps(at[3]), 1);
  low = _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(2, 0, 2, 0));
  high = _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 1, 3, 1));
}

// Indices that put lane 4g + j of a per-point vector in the 4 lanes of point j (a permutexvar).
ATTNKERNELS_ALWAYS_INLINE __m512i point_spread(int g) {
  return _mm512_add_epi32(_mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0), _mm512_set1_epi32(4 * g));
}

// The bilinear samples of the tile's first `count` points from one item's quads:
// dst[c * dst_stride + lane] for c < channels, in the planar tiles' order of operations.
template <int Dims>
inline void sample_quads(const PointTile<float, Dims>& tile, const float* item_quads, const float* zeros,
                         int64_t channels, float* dst, int64_t dst_stride, int64_t count) {
  constexpr int kPairs = PointTile<float, Dims>::kTaps / 2;
  __m512 acc[4];  // group g: points 4g .. 4g + 3, each 4 channels
  for (int g = 0; g < 4; ++g) acc[g] = _mm512_setzero_ps();
  for (int pair = 0; pair < kPairs; ++pair) {
    const __m512 w_low = _mm512_loadu_ps(tile.weight[2 * pair]), w_high = _mm512_loadu_ps(tile.weight[2 * pair + 1]);
    for (int g = 0; g < 4; ++g) {
      __m512 low, high;
      load_pair_quads(tile, pair, g, item_quads, zeros, low, high);
      const __m512i spread = point_spread(g);
      acc[g] = _mm512_add_ps(acc[g], _mm512_mul_ps(_mm512_permutexvar_ps(spread, w_low), low));
      acc[g] = _mm512_add_ps(acc[g], _mm512_mul_ps(_mm512_permutexvar_ps(spread, w_high), high));
    }
  }
  __m512 out[4];
  quads_to_channels(acc, out);
  const __mmask16 lanes = __mmask16((1u << count) - 1u);
  for (int64_t c = 0; c < channels; ++c) {
    if (count == 16) _mm512_storeu_ps(dst + c * dst_stride, out[c]);
    else _mm512_mask_storeu_ps(dst + c * dst_stride, lanes, out[c]);
  }
}
#elif defined(ATTNKERNELS_TILES_AVX2)
// Points 8h + 2g and 8h + 2g + 1 of the tile at tap pair `pair`: `low` their low taps' quads, `high` the high ones'.
template <int Dims>
ATTNKERNELS_ALWAYS_INLINE void load_pair_quads(const PointTile<float, Dims>& tile, int pair, int h, int g,
                                               const float* item_quads, const float* zeros, __m256& low,
                                               __m256& high) {
  const int32_t q0 = tile.quad[pair][8 * h + 2 * g], q1 = tile.quad[pair][8 * h + 2 * g + 1];
  const __m256 a = _mm256_loadu_ps(q0 >= 0 ? item_quads + int64_t(q0) * kQuad : zeros);
  const __m256 b = _mm256_loadu_ps(q1 >= 0 ? item_quads + int64_t(q1) * kQuad : zeros);
  low = _mm256_permute2f128_ps(a, b, 0x20);
  high = _mm256_permute2f128_ps(a, b, 0x31);
}

// Indices that put lane 2g + j of a half's per-point vector in the 4 lanes of point j.
ATTNKERNELS_ALWAYS_INLINE __m256i point_spread(int g) {
  return _mm256_setr_epi32(2 * g, 2 * g, 2 * g, 2 * g, 2 * g + 1, 2 * g + 1, 2 * g + 1, 2 * g + 1);
}

// sample_quads in AVX2: 2 points per vector, one 8-point half of the tile after the other.
template <int Dims>
inline void sample_quads(const PointTile<float, Dims>& tile, const float* item_quads, const float* zeros,
                         int64_t channels, float* dst, int64_t dst_stride, int64_t count) {
  constexpr int kPairs = PointTile<float, Dims>::kTaps / 2;
  for (int h = 0; h < 2 && 8 * h < count; ++h) {
    __m256 acc[4];  // group g: points 8h + 2g, 8h + 2g + 1, each 4 channels
    for (int g = 0; g < 4; ++g) acc[g] = _mm256_setzero_ps();
    for (int pair = 0; pair < kPairs; ++pair) {
      const __m256 w_low = _mm256_loadu_ps(tile.weight[2 * pair] + 8 * h);
      const __m256 w_high = _mm256_loadu_ps(tile.weight[2 * pair + 1] + 8 * h);
      for (int g = 0; g < 4; ++g) {
        __m256 low, high;
        load_pair_quads(tile, pair, h, g, item_quads, zeros, low, high);
        const __m256i spread = point_spread(g);
        acc[g] = _mm256_add_ps(acc[g], _mm256_mul_ps(_mm256_permutevar8x32_ps(w_low, spread), low));
        acc[g] = _mm256_add_ps(acc[g], _mm256_mul_ps(_mm256_permutevar8x32_ps(w_high, spread), high));
      }
    }
    __m256 out[4];
    quads_to_channels(acc, out);
    const bool whole = count >= 8 * (h + 1);
    const __m256i lanes = first_lanes_avx2(count, h);
    for (int64_t c = 0; c < channels; ++c) {
      float* at = dst + c * dst_stride + 8 * h;
      if (whole) _mm256_storeu_ps(at, out[c]);
      else _mm256_maskstore_ps(at, lanes, out[c]);
    }
  }
}
#endif


#if defined(__AVX512F__) || defined(ATTNKERNELS_TILES_AVX2)
// tile_backward (tile_backward.h) for 3 or 4 channels from quads, with the same
// operations in the same order. `grad_out` at the tile's first point of the item
// (C, out_plane); `grads`, when given, the item's bordered quads of a private input
// gradient: weight * grad_output is added at each tap (a tap pair beyond the border
// skipped; the border itself is never read back). With `grad_xyz`, sets
// grad_xyz[axis][lane] = sum over channels of grad_output * d sample / d coordinate,
// 0 past `count`.
template <int Dims>
inline void quads_tile_backward(const PointTile<float, Dims>& tile, const float* item_quads, const float* zeros,
                                const float* grad_out, int64_t out_plane, int64_t C, int64_t count, float* grads,
                                float (*grad_xyz)[PointTile<float, Dims>::kLanes]) {
  constexpr int L = PointTile<float, Dims>::kLanes;
  constexpr int kPairs = PointTile<float, Dims>::kTaps / 2;
  alignas(64) float g[L * kQuad];  // the points' grad_output as quads, zeros past count
  interleave_row(grad_out, out_plane, C, count, g);
  std::fill(g + count * kQuad, g + L * kQuad, 0.0f);
  if (grads != nullptr) {
    for (int64_t l = 0; l < count; ++l) {
      const __m128 point_grad = _mm_load_ps(g + l * kQuad);
      for (int pair = 0; pair < kPairs; ++pair) {
        const int32_t q = tile.quad[pair][l];
        if (q < 0) continue;
        float* at = grads + int64_t(q) * kQuad;
        // 16-byte updates: the next point's low tap is often this one's high tap, and an update of
        // the same 16 bytes forwards from the store where a half-overlapping 32-byte one would stall.
        _mm_storeu_ps(at, _mm_add_ps(_mm_loadu_ps(at), _mm_mul_ps(_mm_set1_ps(tile.weight[2 * pair][l]), point_grad)));
        _mm_storeu_ps(at + kQuad, _mm_add_ps(_mm_loadu_ps(at + kQuad),
                                             _mm_mul_ps(_mm_set1_ps(tile.weight[2 * pair + 1][l]), point_grad)));
      }
    }
  }
  if (grad_xyz == nullptr) return;
#if defined(__AVX512F__)
  __m512 sums[4][Dims];  // per group of 4 points and axis: sum over taps of d weight * value, per channel
  for (int q = 0; q < 4; ++q) {
    for (int a = 0; a < Dims; ++a) sums[q][a] = _mm512_setzero_ps();
  }
  for (int pair = 0; pair < kPairs; ++pair) {
    __m512 d_low[Dims], d_high[Dims];
    for (int a = 0; a < Dims; ++a) {
      d_low[a] = _mm512_loadu_ps(tile.dweight[2 * pair][a]);
      d_high[a] = _mm512_loadu_ps(tile.dweight[2 * pair + 1][a]);
    }
    for (int q = 0; q < 4; ++q) {
      __m512 low, high;
      load_pair_quads(tile, pair, q, item_quads, zeros, low, high);
      const __m512i spread = point_spread(q);
      for (int a = 0; a < Dims; ++a) {
        sums[q][a] = _mm512_add_ps(sums[q][a], _mm512_mul_ps(_mm512_permutexvar_ps(spread, d_low[a]), low));
        sums[q][a] = _mm512_add_ps(sums[q][a], _mm512_mul_ps(_mm512_permutexvar_ps(spread, d_high[a]), high));
      }
    }
  }
  const __mmask16 lanes = __mmask16((1u << count) - 1u);
  for (int a = 0; a < Dims; ++a) {
    __m512 products[4], channels[4];
    for (int q = 0; q < 4; ++q) products[q] = _mm512_mul_ps(sums[q][a], _mm512_load_ps(g + 16 * q));
    quads_to_channels(products, channels);
    __m512 total = _mm512_setzero_ps();
    for (int64_t c = 0; c < C; ++c) total = _mm512_add_ps(total, channels[c]);
    // Lanes past the row end: grad is 0 there, but 0 * (a value of an arbitrary point) may be NaN.
    _mm512_storeu_ps(grad_xyz[a], _mm512_maskz_mov_ps(lanes, total));
  }
#else
  for (int h = 0; h < 2; ++h) {
    __m256 sums[4][Dims];  // per group of 2 points and axis
    for (int q = 0; q < 4; ++q) {
      for (int a = 0; a < Dims; ++a) sums[q][a] = _mm256_setzero_ps();
    }
    for (int pair = 0; pair < kPairs; ++pair) {
      for (int q = 0; q < 4; ++q) {
        __m256 low, high;
        load_pair_quads(tile, pair, h, q, item_quads, zeros, low, high);
        const __m256i spread = point_spread(q);
        for (int a = 0; a < Dims; ++a) {
          const __m256 d_low = _mm256_loadu_ps(tile.dweight[2 * pair][a] + 8 * h);
          const __m256 d_high = _mm256_loadu_ps(tile.dweight[2 * pair + 1][a] + 8 * h);
          sums[q][a] = _mm256_add_ps(sums[q][a], _mm256_mul_ps(_mm256_permutevar8x32_ps(d_low, spread), low));
          sums[q][a] = _mm256_add_ps(sums[q][a], _mm256_mul_ps(_mm256_permutevar8x32_ps(d_high, spread), high));
        }
      }
    }
    const __m256i lanes = first_lanes_avx2(count, h);
    for (int a = 0; a < Dims; ++a) {
      __m256 products[4], channels[4];
      for (int q = 0; q < 4; ++q) products[q] = _mm256_mul_ps(sums[q][a], _mm256_load_ps(g + 32 * h + 8 * q));
      quads_to_channels(products, channels);
      __m256 total = _mm256_setzero_ps();
      for (int64_t c = 0; c < C; ++c) total = _mm256_add_ps(total, channels[c]);
      _mm256_storeu_ps(grad_xyz[a] + 8 * h, _mm256_and_ps(_mm256_castsi256_ps(lanes), total));
    }
  }
#endif
}
#endif

// The input gradient (N, C, [D,] H, W) in `input`'s dtype and gradient layout
// (gradient_channels_last): the sum, in copy order, of the interior positions of
// `copies` private gradients in the quad layout (quad_buffer_size floats apart).
template <typename scalar_t, int Dims>
at::Tensor reduce_quad_private_grads(const float* copies_ptr, int64_t copies, const SamplerShape& s,
                                     const at::Tensor& input) {
  at::Tensor grad = at::empty(input.sizes(), input.options().memory_format(at::MemoryFormat::Contiguous));
  scalar_t* out = grad.mutable_data_ptr<scalar_t>();
  const int64_t per_copy = quad_buffer_size<Dims>(s);
  const int64_t width = s.in_size[0], C = s.channels;
  int64_t rows_per_item = 1;  // rows of the input (all axes but x)
  for (int a = 1; a < Dims; ++a) rows_per_item *= s.in_size[a];
  at::parallel_for(0, s.batch * rows_per_item, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / rows_per_item;
      const int64_t row = r - n * rows_per_item;
      // The row's first position in the bordered layout.
      int64_t rest = row, bordered = 1, stride = width + 2;
      for (int a = 1; a < Dims; ++a) {
        bordered += (rest % s.in_size[a] + 1) * stride;
        rest /= s.in_size[a];
        stride *= s.in_size[a] + 2;
      }
      const float* first = copies_ptr + (n * bordered_points<Dims>(s) + bordered) * kQuad;
      scalar_t* dst = out + n * C * s.in_points + row * width;
      const auto store = [&](int64_t i, const float* values, int64_t count) {  // values[c * 16 + j]
        for (int64_t c = 0; c < C; ++c) {
          for (int64_t j = 0; j < count; ++j) dst[c * s.in_points + i + j] = static_cast<scalar_t>(values[c * 16 + j]);
        }
      };
      int64_t i = 0;
#if defined(__AVX512F__)
      for (; i + 16 <= width; i += 16) {
        __m512 quads[4], channels[4];
        for (int q = 0; q < 4; ++q) {
          const float* at = first + (i + 4 * q) * kQuad;
          quads[q] = _mm512_loadu_ps(at);
          for (int64_t k = 1; k < copies; ++k) quads[q] = _mm512_add_ps(quads[q], _mm512_loadu_ps(at + k * per_copy));
        }
        quads_to_channels(quads, channels);
        if constexpr (std::is_same_v<scalar_t, float>) {
          for (int64_t c = 0; c < C; ++c) _mm512_storeu_ps(dst + c * s.in_points + i, channels[c]);
        } else {
          alignas(64) float values[4 * 16];
          for (int c = 0; c < 4; ++c) _mm512_store_ps(values + 16 * c, channels[c]);
          store(i, values, 16);
        }
      }
#elif defined(ATTNKERNELS_TILES_AVX2)
      for (; i + 8 <= width; i += 8) {
        __m256 quads[4], channels[4];
        for (int q = 0; q < 4; ++q) {
          const float* at = first + (i + 2 * q) * kQuad;
          quads[q] = _mm256_loadu_ps(at);
          for (int64_t k = 1; k < copies; ++k) quads[q] = _mm256_add_ps(quads[q], _mm256_loadu_ps(at + k * per_copy));
        }
        quads_to_channels(quads, channels);
        if constexpr (std::is_same_v<scalar_t, float>) {
          for (int64_t c = 0; c < C; ++c) _mm256_storeu_ps(dst + c * s.in_points + i, channels[c]);
        } else {
          alignas(32) float values[4 * 16];
          for (int c = 0; c < 4; ++c) _mm256_store_ps(values + 16 * c, channels[c]);
          store(i, values, 8);
        }
      }
#endif
      for (; i < width; ++i) {
        float values[4 * 16];
        for (int64_t c = 0; c < C; ++c) {
          const float* at = first + i * kQuad + c;
          float v = at[0];
          for (int64_t k = 1; k < copies; ++k) v += at[k * per_copy];
          values[c * 16] = v;
        }
        store(i, values, 1);
      }
    }
  });
  return in_gradient_layout(grad, input);
}

}  // namespace ATTNKERNELS_CPU_ISA
}  // namespace cpu
}  // namespace attnkernels
