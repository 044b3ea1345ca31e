// Small float transposes in vector registers, for the layout changes around
// the CPU sampling loops: (C, points) runs of the input and of grad_output to
// point-major (points, C) rows and back. Element by element (one scalar load
// and one strided scalar store per value) the three layout changes of the
// video backward took about a fifth of its time (perf, Zen 4).
#pragma once

#include "../cpu_isa.h"

#include <cstdint>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace attnkernels {
namespace cpu {
inline namespace ATTNKERNELS_CPU_ISA {  // see cpu_isa.h

// The side of the largest block transpose_block moves in registers (1 where
// it goes element by element).
#if defined(__AVX512F__)
constexpr int64_t kTransposeTile = 16;
#elif defined(__AVX2__)
constexpr int64_t kTransposeTile = 8;
#else
constexpr int64_t kTransposeTile = 1;
#endif

#if defined(__AVX512F__)
// dst[j * dst_stride + i] = r[i][j] for i < rows, j < cols (at most 16 each).
ATTNKERNELS_ALWAYS_INLINE void store_transposed_avx512(const __m512 (&r)[16], int64_t rows, int64_t cols, float* dst,
                                                       int64_t dst_stride) {
  const __mmask16 row_mask = __mmask16((1u << rows) - 1u);
  // Rows 2k, 2k + 1 interleaved, then rows 4g .. 4g + 3 of column 4L + k in 128-bit lane L of q[g][k].
  // Unrolled, so that the rows and partial results stay in registers.
  __m512 t[16];
#pragma GCC unroll 8
  for (int k = 0; k < 8; ++k) {
    t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
    t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
  }
  __m512 q[4][4];
#pragma GCC unroll 4
  for (int g = 0; g < 4; ++g) {
    const __m512d lo01 = _mm512_castps_pd(t[4 * g]), hi01 = _mm512_castps_pd(t[4 * g + 1]);
    const __m512d lo23 = _mm512_castps_pd(t[4 * g + 2]), hi23 = _mm512_castps_pd(t[4 * g + 3]);
    q[g][0] = _mm512_castpd_ps(_mm512_unpacklo_pd(lo01, lo23));
    q[g][1] = _mm512_castpd_ps(_mm512_unpackhi_pd(lo01, lo23));
    q[g][2] = _mm512_castpd_ps(_mm512_unpacklo_pd(hi01, hi23));
    q[g][3] = _mm512_castpd_ps(_mm512_unpackhi_pd(hi01, hi23));
  }
  // Column 4L + k: lane L of q[0][k], q[1][k], q[2][k], q[3][k], in that order.
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k) {
    const __m512 s01_lo = _mm512_shuffle_f32x4(q[0][k], q[1][k], 0x44);  // q0 lanes 0 1, q1 lanes 0 1
    const __m512 s01_hi = _mm512_shuffle_f32x4(q[0][k], q[1][k], 0xEE);  // q0 lanes 2 3, q1 lanes 2 3
    const __m512 s23_lo = _mm512_shuffle_f32x4(q[2][k], q[3][k], 0x44);
    const __m512 s23_hi = _mm512_shuffle_f32x4(q[2][k], q[3][k], 0xEE);
    const __m512 column[4] = {_mm512_shuffle_f32x4(s01_lo, s23_lo, 0x88), _mm512_shuffle_f32x4(s01_lo, s23_lo, 0xDD),
                              _mm512_shuffle_f32x4(s01_hi, s23_hi, 0x88), _mm512_shuffle_f32x4(s01_hi, s23_hi, 0xDD)};
#pragma GCC unroll 4
    for (int lane = 0; lane < 4; ++lane) {
      const int j = 4 * lane + k;
      if (j >= cols) continue;
      if (rows == 16) _mm512_storeu_ps(dst + j * dst_stride, column[lane]);
      else _mm512_mask_storeu_ps(dst + j * dst_stride, row_mask, column[lane]);
    }
  }
}
#elif defined(__AVX2__)
// dst[j * dst_stride + i] = r[i][j] for i < rows, j < cols (at most 8 each).
ATTNKERNELS_ALWAYS_INLINE void store_transposed_avx2(const __m256 (&r)[8], int64_t rows, int64_t cols, float* dst,
                                                     int64_t dst_stride) {
  const __m256i row_mask =
      _mm256_cmpgt_epi32(_mm256_set1_epi32(int32_t(rows)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  // Rows 2k, 2k + 1 interleaved; then rows 4g .. 4g + 3 of column 4h + k in 128-bit half h of q[g][k].
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 q0[4] = {_mm256_shuffle_ps(t0, t2, 0x44), _mm256_shuffle_ps(t0, t2, 0xEE),
                        _mm256_shuffle_ps(t1, t3, 0x44), _mm256_shuffle_ps(t1, t3, 0xEE)};
  const __m256 q1[4] = {_mm256_shuffle_ps(t4, t6, 0x44), _mm256_shuffle_ps(t4, t6, 0xEE),
                        _mm256_shuffle_ps(t5, t7, 0x44), _mm256_shuffle_ps(t5, t7, 0xEE)};
  // Unrolled, so that the rows and partial results stay in registers.
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k) {
    const __m256 column[2] = {_mm256_permute2f128_ps(q0[k], q1[k], 0x20), _mm256_permute2f128_ps(q0[k], q1[k], 0x31)};
#pragma GCC unroll 2
    for (int half = 0; half < 2; ++half) {
      const int j = 4 * half + k;
      if (j >= cols) continue;
      if (rows == 8) _mm256_storeu_ps(dst + j * dst_stride, column[half]);
      else _mm256_maskstore_ps(dst + j * dst_stride, row_mask, column[half]);
    }
  }
}
#endif

// dst[j * dst_stride + i] = sum over r < count of sources[r][offset + i * src_stride + j],
// for i < rows and j < cols (both at most kTransposeTile); the sources are summed in order.
inline void transpose_block(const float* const* sources, int64_t count, int64_t offset, int64_t src_stride,
                            int64_t rows, int64_t cols, float* dst, int64_t dst_stride) {
#if defined(__AVX512F__)
  __m512 r[16];
  if (count == 1 && rows == 16 && cols == 16) {
    // A whole block of one source (the layout copies): plain loads, and the rows stay in registers
    // (with the masked loads and the summing loop GCC kept them on the stack).
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(sources[0] + offset + i * src_stride);
    store_transposed_avx512(r, 16, 16, dst, dst_stride);
    return;
  }
  const __mmask16 col_mask = __mmask16((1u << cols) - 1u);
  for (int i = 0; i < 16; ++i) {
    r[i] = _mm512_setzero_ps();
    if (i >= rows) continue;
    r[i] = _mm512_maskz_loadu_ps(col_mask, sources[0] + offset + i * src_stride);
    for (int64_t c = 1; c < count; ++c) {
      r[i] = _mm512_add_ps(r[i], _mm512_maskz_loadu_ps(col_mask, sources[c] + offset + i * src_stride));
    }
  }
  store_transposed_avx512(r, rows, cols, dst, dst_stride);
#elif defined(__AVX2__)
  __m256 r[8];
  if (count == 1 && rows == 8 && cols == 8) {
    // A whole block of one source (the layout copies): plain loads, and the rows stay in registers
    // (with the masked loads and the summing loop GCC kept them on the stack).
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(sources[0] + offset + i * src_stride);
    store_transposed_avx2(r, 8, 8, dst, dst_stride);
    return;
  }
  const __m256i lane_index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i col_mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(int32_t(cols)), lane_index);
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm256_setzero_ps();
    if (i >= rows) continue;
    r[i] = _mm256_maskload_ps(sources[0] + offset + i * src_stride, col_mask);
    for (int64_t c = 1; c < count; ++c) {
      r[i] = _mm256_add_ps(r[i], _mm256_maskload_ps(sources[c] + offset + i * src_stride, col_mask));
    }
  }
  store_transposed_avx2(r, rows, cols, dst, dst_stride);
#else
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) {
      float v = sources[0][offset + i * src_stride + j];
      for (int64_t c = 1; c < count; ++c) v += sources[c][offset + i * src_stride + j];
      dst[j * dst_stride + i] = v;
    }
  }
#endif
}

// dst[j * dst_stride + i] = sum over r < count of sources[r][i * src_stride + j], in order,
// for i < rows, j < cols of any size, in blocks of kTransposeTile.
inline void transpose_sum(const float* const* sources, int64_t count, int64_t src_stride, int64_t rows, int64_t cols,
                          float* dst, int64_t dst_stride) {
  for (int64_t i0 = 0; i0 < rows; i0 += kTransposeTile) {
    const int64_t block_rows = rows - i0 < kTransposeTile ? rows - i0 : kTransposeTile;
    for (int64_t j0 = 0; j0 < cols; j0 += kTransposeTile) {
      const int64_t block_cols = cols - j0 < kTransposeTile ? cols - j0 : kTransposeTile;
      transpose_block(sources, count, i0 * src_stride + j0, src_stride, block_rows, block_cols,
                      dst + j0 * dst_stride + i0, dst_stride);
    }
  }
}

// dst[j * dst_stride + i] = src[i * src_stride + j] for i < rows, j < cols of any size.
inline void transpose(const float* src, int64_t src_stride, int64_t rows, int64_t cols, float* dst,
                      int64_t dst_stride) {
  transpose_sum(&src, 1, src_stride, rows, cols, dst, dst_stride);
}

}  // namespace ATTNKERNELS_CPU_ISA
}  // namespace cpu
}  // namespace attnkernels
