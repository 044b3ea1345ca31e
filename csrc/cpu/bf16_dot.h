// bfloat16 tile products with the AVX512-BF16 dot-product instruction (vdpbf16ps), for the
// attention kernels' bfloat16 inputs: twice the multiply-adds per instruction of float32 FMAs,
// with float32 accumulation. Only the avx512 variant has them, and it calls them only when
// bf16_dot_products_enabled() (cpu_kernels.h) says the CPU has AVX512-BF16; the functions
// carry the target attribute themselves, so the avx512 variant's flags stay as they are.
//
// vdpbf16ps adds, in each of 16 float32 lanes j, a[2i] * b[2i] + a[2i + 1] * b[2i + 1]: the
// products run over pairs of the reduction index. So the right operand B (k x n) is packed as
// 32-bit words (p, j) = (B[2p][j], B[2p + 1][j]), in panels of kDotColumns columns (the last
// one padded), each panel's pair_count(k) rows of kDotColumns words contiguous: the register
// tile reads its panel front to back. The left operand is read as one 32-bit pair (A[i][2p],
// A[i][2p + 1]) at a time, broadcast to every lane, from any layout with a fixed stride per row
// and per pair. An odd reduction length ends with a pair whose second element is zero in both.
#pragma once

#include "../cpu_isa.h"

#if defined(ATTNKERNELS_CPU_AVX512)
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#define ATTNKERNELS_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

namespace attnkernels {
namespace cpu {
inline namespace ATTNKERNELS_CPU_ISA {  // see cpu_isa.h

// Columns of the register tile; a packed row's length is a multiple of it.
constexpr int64_t kDotColumns = 32;
// Rows of the register tile: 8 x 2 accumulators leave registers for B and the broadcasts.
constexpr int kDotRows = 8;

inline int64_t packed_width(int64_t n) { return (n + kDotColumns - 1) / kDotColumns * kDotColumns; }
inline int64_t pair_count(int64_t k) { return (k + 1) / 2; }
// Words of a packed B (k x n).
inline int64_t packed_size(int64_t k, int64_t n) { return pair_count(k) * packed_width(n); }
// Where word (p, j) of a packed B with `pairs` rows lives.
inline int64_t packed_index(int64_t pairs, int64_t p, int64_t j) {
  return (j / kDotColumns) * pairs * kDotColumns + p * kDotColumns + j % kDotColumns;
}

inline uint16_t bf16_bits(c10::BFloat16 x) { return x.x; }

// Packs B from rows of X where the reduction index runs along the row: B[r][j] = X[j][r],
// X (n x k, row stride ld). out: packed_size(k, n) words. Whole panels of even-length rows
// gather a pair from each of 16 rows at once; the rest goes word by word.
ATTNKERNELS_BF16_TARGET inline void pack_pairs_from_rows(const c10::BFloat16* x, int64_t n, int64_t k, int64_t ld,
                                                         uint32_t* out) {
  const int64_t pairs = pair_count(k), whole = k / 2;
  for (int64_t j0 = 0; j0 < n; j0 += kDotColumns) {
    const int64_t columns = std::min<int64_t>(kDotColumns, n - j0);
    uint32_t* panel = out + packed_index(pairs, 0, j0);
    const c10::BFloat16* rows = x + j0 * ld;
    if (columns == kDotColumns && ld % 2 == 0 && 16 * ld < (int64_t(1) << 30)) {
      // Word offsets of the panel's rows; 32-bit indices (scaled by 2 bytes) fit by the test above.
      const __m512i row_offsets = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2,
                                                                      1, 0),
                                                     _mm512_set1_epi32(static_cast<int>(ld / 2)));
      for (int64_t p = 0; p < whole; ++p) {
        const void* first = rows + 2 * p;
        const void* second = rows + 16 * ld + 2 * p;
        _mm512_storeu_si512(panel + p * kDotColumns, _mm512_i32gather_epi32(row_offsets, first, 4));
        _mm512_storeu_si512(panel + p * kDotColumns + 16, _mm512_i32gather_epi32(row_offsets, second, 4));
      }
    } else {
      for (int64_t p = 0; p < whole; ++p) {
        for (int64_t j = 0; j < columns; ++j) {
          uint32_t word;
          std::memcpy(&word, rows + j * ld + 2 * p, sizeof(word));
          panel[p * kDotColumns + j] = word;
        }
      }
    }
    if (pairs > whole) {
      for (int64_t j = 0; j < columns; ++j) panel[whole * kDotColumns + j] = bf16_bits(rows[j * ld + k - 1]);
    }
  }
}

// 32 bfloat16 of `low` and `high` interleaved: word j = (low[j], high[j]) for j < 32.
ATTNKERNELS_BF16_TARGET inline void interleave32(__m512i low, __m512i high, uint32_t* out, int64_t n) {
  const __m512i first = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                         37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i second = _mm512_add_epi16(first, _mm512_set1_epi16(16));
  const __m512i words0 = _mm512_permutex2var_epi16(low, first, high);
  const __m512i words1 = _mm512_permutex2var_epi16(low, second, high);
  if (n >= 32) {
    _mm512_storeu_si512(out, words0);
    _mm512_storeu_si512(out + 16, words1);
  } else {
    _mm512_mask_storeu_epi32(out, static_cast<__mmask16>(n >= 16 ? 0xFFFF : (1u << n) - 1u), words0);
    if (n > 16) _mm512_mask_storeu_epi32(out + 16, static_cast<__mmask16>((1u << (n - 16)) - 1u), words1);
  }
}

ATTNKERNELS_BF16_TARGET inline __mmask32 mask32(int64_t n) {
  return n >= 32 ? ~__mmask32(0) : static_cast<__mmask32>((uint64_t(1) << n) - 1u);
}

// 32 values of a row as bfloat16 (the first n, zeros after).
ATTNKERNELS_BF16_TARGET inline __m512i load_bf16x32(const c10::BFloat16* row, int64_t n) {
  return _mm512_maskz_loadu_epi16(mask32(n), row);
}
ATTNKERNELS_BF16_TARGET inline __m512i load_bf16x32(const float* row, int64_t n) {
  const __mmask16 m0 = static_cast<__mmask16>(mask32(std::min<int64_t>(n, 16)));
  const __mmask16 m1 = static_cast<__mmask16>(mask32(std::max<int64_t>(n - 16, 0)));
  const __m512 lo = _mm512_maskz_loadu_ps(m0, row), hi = _mm512_maskz_loadu_ps(m1, row + 16);
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));  // rounds to nearest even; NaN stays NaN
}

// How pack_pairs_from_columns lays its words out: in panels (a right operand), or as rows of
// packed_width(n) words (a left operand read transposed: A(i, p) = word (p, i), so that
// a_row = 2 and a_pair = 2 * packed_width(n) elements).
enum class PairLayout { kPanels, kRows };

// Packs B from X (k x n, row stride ld) where the reduction index runs down the columns:
// word (p, j) = (X[2p][j], X[2p + 1][j]). T: c10::BFloat16, or float (rounded to bfloat16).
template <typename T>
ATTNKERNELS_BF16_TARGET void pack_pairs_from_columns(const T* x, int64_t k, int64_t n, int64_t ld, uint32_t* out,
                                                     PairLayout layout = PairLayout::kPanels) {
  static_assert(kDotColumns == 32, "a packed panel row is the 32 words interleave32 writes");
  const int64_t pairs = pair_count(k), width = packed_width(n);
  for (int64_t p = 0; p < pairs; ++p) {
    const T* low = x + 2 * p * ld;
    const bool has_high = 2 * p + 1 < k;
    for (int64_t j = 0; j < n; j += 32) {
      const int64_t count = std::min<int64_t>(32, n - j);
      const __m512i lo = load_bf16x32(low + j, count);
      const __m512i hi = has_high ? load_bf16x32(low + ld + j, count) : _mm512_setzero_si512();
      interleave32(lo, hi, out + (layout == PairLayout::kPanels ? packed_index(pairs, p, j) : p * width + j), count);
    }
  }
}

// Rows of float32 X (rows x k, row stride ld) rounded to bfloat16, each row zero-padded to an
// even length: out (rows x 2 * pair_count(k)), a left operand with row stride 2 * pair_count(k).
ATTNKERNELS_BF16_TARGET inline void round_rows(const float* x, int64_t rows, int64_t k, int64_t ld,
                                               c10::BFloat16* out) {
  const int64_t out_ld = 2 * pair_count(k);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < out_ld; j += 32) {
      const int64_t count = std::min<int64_t>(32, k - j);
      _mm512_mask_storeu_epi16(out + r * out_ld + j, mask32(std::min<int64_t>(32, out_ld - j)),
                               load_bf16x32(x + r * ld + j, count));
    }
  }
}

// C (kRows x up to 32 columns) = alpha * A B (+ C when accumulate).
// b: the panel (pairs rows of kDotColumns words).
template <int kRows>
ATTNKERNELS_BF16_TARGET void dot_tile(int64_t pairs, const c10::BFloat16* a, int64_t a_row, int64_t a_pair,
                                      const uint32_t* b, int64_t columns, float alpha, bool accumulate, float* c,
                                      int64_t ldc) {
  __m512 acc[kRows][2];
  for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  const bool two = columns > 16;
  for (int64_t p = 0; p < pairs; ++p) {
    const __m512bh b0 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(b + p * kDotColumns));
    const __m512bh b1 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(b + p * kDotColumns + 16));
    const c10::BFloat16* a_p = a + p * a_pair;
    for (int r = 0; r < kRows; ++r) {
      int32_t pair;
      std::memcpy(&pair, a_p + r * a_row, sizeof(pair));
      const __m512bh ar = reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], ar, b0);
      if (two) acc[r][1] = _mm512_dpbf16_ps(acc[r][1], ar, b1);
    }
  }
  const __m512 alpha16 = _mm512_set1_ps(alpha);
  const __mmask16 m0 = static_cast<__mmask16>(mask32(std::min<int64_t>(columns, 16)));
  const __mmask16 m1 = static_cast<__mmask16>(mask32(std::max<int64_t>(columns - 16, 0)));
  for (int r = 0; r < kRows; ++r) {
    float* row = c + r * ldc;
    __m512 v0 = _mm512_mul_ps(acc[r][0], alpha16), v1 = _mm512_mul_ps(acc[r][1], alpha16);
    if (accumulate) {
      v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, row));
      v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, row + 16));
    }
    _mm512_mask_storeu_ps(row, m0, v0);
    _mm512_mask_storeu_ps(row + 16, m1, v1);
  }
}

// C (m x n, float32, row stride ldc) = alpha * A B (+ C when accumulate), the reduction over
// `pairs` pairs. A(i, p) is the pair of bfloat16 at a + i * a_row + p * a_pair (in elements);
// b is a packed B of `pairs` rows and n columns.
ATTNKERNELS_BF16_TARGET inline void dot_product(int64_t m, int64_t n, int64_t pairs, const c10::BFloat16* a,
                                                int64_t a_row, int64_t a_pair, const uint32_t* b, float alpha,
                                                bool accumulate, float* c, int64_t ldc) {
  for (int64_t j = 0; j < n; j += kDotColumns) {
    const int64_t columns = std::min<int64_t>(kDotColumns, n - j);
    const uint32_t* panel = b + packed_index(pairs, 0, j);
    int64_t i = 0;
    for (; i + kDotRows <= m; i += kDotRows) {
      dot_tile<kDotRows>(pairs, a + i * a_row, a_row, a_pair, panel, columns, alpha, accumulate, c + i * ldc + j,
                         ldc);
    }
    const c10::BFloat16* a_i = a + i * a_row;
    float* c_i = c + i * ldc + j;
    switch (m - i) {
      case 7: dot_tile<7>(pairs, a_i, a_row, a_pair, panel, columns, alpha, accumulate, c_i, ldc); break;
      case 6: dot_tile<6>(pairs, a_i, a_row, a_pair, panel, columns, alpha, accumulate, c_i, ldc); break;
      case 5: dot_tile<5>(pairs, a_i, a_row, a_pair, panel, columns, alpha, accumulate, c_i, ldc); break;
      case 4: dot_tile<4>(pairs, a_i, a_row, a_pair, panel, columns, alpha, accumulate, c_i, ldc); break;
      case 3: dot_tile<3>(pairs, a_i, a_row, a_pair, panel, columns, alpha, accumulate, c_i, ldc); break;
      case 2: dot_tile<2>(pairs, a_i, a_row, a_pair, panel, columns, alpha, accumulate, c_i, ldc); break;
      case 1: dot_tile<1>(pairs, a_i, a_row, a_pair, panel, columns, alpha, accumulate, c_i, ldc); break;
      default: break;
    }
  }
}

}  // namespace ATTNKERNELS_CPU_ISA
}  // namespace cpu
}  // namespace attnkernels

#endif  // ATTNKERNELS_CPU_AVX512
