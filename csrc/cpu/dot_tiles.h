// Tile products of the CPU attention kernels on register tiles: in the avx512 variant 8 rows x
// 32 float32 columns (two zmm registers per row), in the avx2 variant 6 rows x 16 columns (two ymm
// registers per row: 12 accumulators of the 16 registers).
// - bfloat16 with the AVX512-BF16 dot-product instruction (vdpbf16ps; avx512 variant only): twice
//   the multiply-adds per instruction of float32 FMAs, float32 accumulation. Called only when
//   bf16_dot_products_enabled() (cpu_kernels.h) says the CPU has AVX512-BF16; those functions
//   carry the target attribute themselves, so the avx512 variant's flags stay as they are.
// - float32 with FMAs (fma_product): the same tiles, for float32 inputs (AVX-512 F, or AVX2 + FMA).
//
// vdpbf16ps adds, in each of 16 float32 lanes j, a[2i] * b[2i] + a[2i + 1] * b[2i + 1]: the
// products run over pairs of the reduction index. So the right operand B (k x n) is packed as
// 32-bit words (p, j) = (B[2p][j], B[2p + 1][j]), in panels of kDotColumns columns (the last
// one padded), each panel's pair_count(k) rows of kDotColumns words contiguous: the register
// tile reads its panel front to back. The left operand is read as one 32-bit pair (A[i][2p],
// A[i][2p + 1]) at a time, broadcast to every lane, from any layout with a fixed stride per row
// and per pair. An odd reduction length ends with a pair whose second element is zero in both.
// float32 operands use the same layout with one float per word (a "pair" of one element).
#pragma once

#include "../cpu_isa.h"

#if defined(ATTNKERNELS_CPU_AVX512) || defined(ATTNKERNELS_CPU_AVX2)
#define ATTNKERNELS_DOT_TILES 1
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace attnkernels {
namespace cpu {
inline namespace ATTNKERNELS_CPU_ISA {  // see cpu_isa.h

// Columns of the register tile (two vector registers); a packed row's length is a multiple of it.
// Rows: kDotRows x 2 accumulators leave registers for B and the broadcasts (32 zmm, 16 ymm).
#if defined(ATTNKERNELS_CPU_AVX512)
constexpr int64_t kDotColumns = 32;
constexpr int kDotRows = 8;
#else
constexpr int64_t kDotColumns = 16;
constexpr int kDotRows = 6;
#endif

inline int64_t packed_width(int64_t n) { return (n + kDotColumns - 1) / kDotColumns * kDotColumns; }
inline int64_t pair_count(int64_t k) { return (k + 1) / 2; }
// Words of a packed B (k x n).
inline int64_t packed_size(int64_t k, int64_t n) { return pair_count(k) * packed_width(n); }
// Where word (p, j) of a packed B with `pairs` rows lives.
inline int64_t packed_index(int64_t pairs, int64_t p, int64_t j) {
  return (j / kDotColumns) * pairs * kDotColumns + p * kDotColumns + j % kDotColumns;
}

inline uint16_t bf16_bits(c10::BFloat16 x) { return x.x; }

// Elements of T per packed 32-bit word: a pair of bfloat16, or one float.
template <typename T>
constexpr int64_t kPerWord = static_cast<int64_t>(sizeof(uint32_t) / sizeof(T));

// Words [p, p + 8) of the 8 rows at `first` (row stride ld elements of T) into 8 rows of a panel
// (out, row stride kDotColumns words): an 8 x 8 transposition in registers.
template <typename T>
inline void transpose_8x8_words(const T* first, int64_t ld, uint32_t* out) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(reinterpret_cast<const float*>(first + i * ld));
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);      // a0 b0 a1 b1 | a4 b4 a5 b5
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);  // a2 b2 a3 b3 | a6 b6 a7 b7
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);      // a0 b0 c0 d0 | a4 b4 c4 d4
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);  // word 1 | word 5
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int w = 0; w < 4; ++w) {
    float* low = reinterpret_cast<float*>(out + w * kDotColumns);
    float* high = reinterpret_cast<float*>(out + (w + 4) * kDotColumns);
    _mm256_storeu_ps(low, _mm256_permute2f128_ps(r[w], r[w + 4], 0x20));
    _mm256_storeu_ps(high, _mm256_permute2f128_ps(r[w], r[w + 4], 0x31));
  }
}

// Packs B from rows of X where the reduction index runs along the row: B[r][j] = X[j][r],
// X (n x k, row stride ld), T c10::BFloat16 (words of pairs) or float. out: packed_size(k, n)
// words for bfloat16, k * packed_width(n) for float. Whole panels are transposed in blocks of 8
// rows x 8 words, the rest word by word (512 x 64 floats, Zen 5: 1.8 us; word by word 8.8 us,
// and 10 us with AVX-512 gathers of a word from each of 16 rows).
template <typename T>
void pack_words_from_rows(const T* x, int64_t n, int64_t k, int64_t ld, uint32_t* out) {
  constexpr int64_t per_word = kPerWord<T>;
  const int64_t words = (k + per_word - 1) / per_word, whole = k / per_word;
  for (int64_t j0 = 0; j0 < n; j0 += kDotColumns) {
    const int64_t columns = std::min<int64_t>(kDotColumns, n - j0);
    uint32_t* panel = out + packed_index(words, 0, j0);
    const T* rows = x + j0 * ld;
    int64_t first_loose_word = 0;  // words before this one were packed by the transpositions
    if (columns == kDotColumns) {
      first_loose_word = whole / 8 * 8;
      for (int64_t row_group = 0; row_group < kDotColumns / 8; ++row_group) {
        for (int64_t p = 0; p < first_loose_word; p += 8) {
          transpose_8x8_words(rows + row_group * 8 * ld + per_word * p, ld, panel + p * kDotColumns + row_group * 8);
        }
      }
    }
    // Row by row: each row read once, its words written down the panel (which stays in L1).
    for (int64_t j = 0; j < columns; ++j) {
      for (int64_t p = first_loose_word; p < whole; ++p) {
        uint32_t word;
        std::memcpy(&word, rows + j * ld + per_word * p, sizeof(word));
        panel[p * kDotColumns + j] = word;
      }
    }
    if constexpr (per_word == 2) {
      if (words > whole) {  // k odd: the last pair is (X[j][k - 1], 0)
        for (int64_t j = 0; j < columns; ++j) panel[whole * kDotColumns + j] = bf16_bits(rows[j * ld + k - 1]);
      }
    }
  }
}

// The tile loops below are the attention kernels' inner loops: per step of the reduction, two
// vector loads of B, one broadcast per row of A and two FMAs (or dot products) per row, and as
// little else as possible, since at two FMAs per cycle a few extra instructions per step already
// slow the loop. So: whether the second vector of columns is used is a template argument, not a
// test in the loop (with the test inside, GCC kept half the AVX2 accumulators on the stack in one
// build); every loop over the rows is unrolled, so that the accumulators stay in registers; and
// A's rows are addressed through TileRows.

// The addresses of the kRows rows of a left operand, row r at base + r * row_stride (in
// elements), stepped along the reduction together: two pointers, rows [0, 4) and [4, 8), and
// loop-invariant multiples of the stride, which x86 addressing takes as base + index * scale.
// (From one pointer GCC recomputed the row addresses at every step: five extra instructions for
// twelve FMAs in the AVX2 loop.)
template <int kRows, typename T = float>
struct TileRows {
  const T* low;
  const T* high;
  int64_t stride, two, three;

  ATTNKERNELS_ALWAYS_INLINE TileRows(const T* first, int64_t row_stride)
      : low(first), high(first + 4 * row_stride), stride(row_stride), two(2 * row_stride), three(3 * row_stride) {}
  ATTNKERNELS_ALWAYS_INLINE const T* row(int r) const {
    const T* base = r < 4 ? low : high;
    switch (r % 4) {
      case 0: return base;
      case 1: return base + stride;
      case 2: return base + two;
      default: return base + three;
    }
  }
  ATTNKERNELS_ALWAYS_INLINE void step(int64_t elements) {
    low += elements;
    if (kRows > 4) high += elements;
  }
};

#if defined(ATTNKERNELS_CPU_AVX512)
// C (kRows x up to 32 columns, row stride ldc) = alpha * acc (+ C when accumulate): the store
// that ends both kinds of tile (AVX-512F only, so it inlines into the bfloat16-targeted one).
template <int kRows>
inline void store_tile(const __m512 (&acc)[kRows][2], int64_t columns, float alpha, bool accumulate, float* c,
                       int64_t ldc) {
  const auto mask16 = [](int64_t n) {
    return static_cast<__mmask16>(n >= 16 ? 0xFFFF : n <= 0 ? 0 : (1u << n) - 1u);
  };
  const __mmask16 m0 = mask16(columns), m1 = mask16(columns - 16);
  const __m512 alpha16 = _mm512_set1_ps(alpha);
#pragma GCC unroll 8
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

#else
// C (kRows x up to 16 columns, row stride ldc) = alpha * acc (+ C when accumulate).
template <int kRows>
inline void store_tile(const __m256 (&acc)[kRows][2], int64_t columns, float alpha, bool accumulate, float* c,
                       int64_t ldc) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i m0 = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(columns, 8))), lanes);
  const __m256i m1 = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::max<int64_t>(columns - 8, 0))), lanes);
  const __m256 alpha8 = _mm256_set1_ps(alpha);
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r) {
    float* row = c + r * ldc;
    __m256 v0 = _mm256_mul_ps(acc[r][0], alpha8), v1 = _mm256_mul_ps(acc[r][1], alpha8);
    if (columns == kDotColumns) {
      if (accumulate) {
        v0 = _mm256_add_ps(v0, _mm256_loadu_ps(row));
        v1 = _mm256_add_ps(v1, _mm256_loadu_ps(row + 8));
      }
      _mm256_storeu_ps(row, v0);
      _mm256_storeu_ps(row + 8, v1);
    } else {
      if (accumulate) {
        v0 = _mm256_add_ps(v0, _mm256_maskload_ps(row, m0));
        v1 = _mm256_add_ps(v1, _mm256_maskload_ps(row + 8, m1));
      }
      _mm256_maskstore_ps(row, m0, v0);
      _mm256_maskstore_ps(row + 8, m1, v1);
    }
  }
}
#endif

#if defined(ATTNKERNELS_CPU_AVX512)
inline void pack_pairs_from_rows(const c10::BFloat16* x, int64_t n, int64_t k, int64_t ld, uint32_t* out) {
  pack_words_from_rows(x, n, k, ld, out);
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
// padded_pairs (panels only; 0: pair_count(k)) pads each panel to that many pair rows, zero past k,
// for products that reduce in whole steps (AMX: 32 at a time).
template <typename T>
ATTNKERNELS_BF16_TARGET void pack_pairs_from_columns(const T* x, int64_t k, int64_t n, int64_t ld, uint32_t* out,
                                                     PairLayout layout = PairLayout::kPanels,
                                                     int64_t padded_pairs = 0) {
  static_assert(kDotColumns == 32, "a packed panel row is the 32 words interleave32 writes");
  const int64_t pairs = padded_pairs > 0 ? padded_pairs : pair_count(k), width = packed_width(n);
  for (int64_t p = 0; p < pairs; ++p) {
    const T* low = x + 2 * p * ld;
    const bool has_low = 2 * p < k, has_high = 2 * p + 1 < k;
    for (int64_t j = 0; j < n; j += 32) {
      const int64_t count = std::min<int64_t>(32, n - j);
      const __m512i lo = has_low ? load_bf16x32(low + j, count) : _mm512_setzero_si512();
      const __m512i hi = has_high ? load_bf16x32(low + ld + j, count) : _mm512_setzero_si512();
      interleave32(lo, hi, out + (layout == PairLayout::kPanels ? packed_index(pairs, p, j) : p * width + j), count);
    }
  }
}

// Rows of float32 X (rows x k, row stride ld) rounded to bfloat16, each row zero-padded to out_ld
// elements (0: k rounded up to even): a left operand with row stride out_ld.
ATTNKERNELS_BF16_TARGET inline void round_rows(const float* x, int64_t rows, int64_t k, int64_t ld,
                                               c10::BFloat16* out, int64_t out_ld = 0) {
  if (out_ld == 0) out_ld = 2 * pair_count(k);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < out_ld; j += 32) {
      const int64_t count = std::clamp<int64_t>(k - j, 0, 32);
      _mm512_mask_storeu_epi16(out + r * out_ld + j, mask32(std::min<int64_t>(32, out_ld - j)),
                               load_bf16x32(x + r * ld + j, count));
    }
  }
}

// C (kRows x up to 32 columns) = alpha * A B (+ C when accumulate); the second vector of
// columns only when kBothVectors. b: the panel (pairs rows of kDotColumns words).
template <int kRows, bool kBothVectors>
ATTNKERNELS_BF16_TARGET ATTNKERNELS_ALWAYS_INLINE void dot_tile_columns(int64_t pairs, const c10::BFloat16* a,
                                                                        int64_t a_row, int64_t a_pair,
                                                                        const uint32_t* b, int64_t columns,
                                                                        float alpha, bool accumulate, float* c,
                                                                        int64_t ldc) {
  __m512 acc[kRows][2];
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  TileRows<kRows, c10::BFloat16> rows(a, a_row);
  for (int64_t p = 0; p < pairs; ++p) {
    const __m512bh b0 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(b));
    const __m512bh b1 = kBothVectors ? reinterpret_cast<__m512bh>(_mm512_loadu_si512(b + 16)) : b0;
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      int32_t pair;
      std::memcpy(&pair, rows.row(r), sizeof(pair));
      const __m512bh ar = reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], ar, b0);
      if (kBothVectors) acc[r][1] = _mm512_dpbf16_ps(acc[r][1], ar, b1);
    }
    b += kDotColumns;
    rows.step(a_pair);
  }
  store_tile<kRows>(acc, columns, alpha, accumulate, c, ldc);
}

template <int kRows>
ATTNKERNELS_BF16_TARGET void dot_tile(int64_t pairs, const c10::BFloat16* a, int64_t a_row, int64_t a_pair,
                                      const uint32_t* b, int64_t columns, float alpha, bool accumulate, float* c,
                                      int64_t ldc) {
  if (columns > kDotColumns / 2) {
    dot_tile_columns<kRows, true>(pairs, a, a_row, a_pair, b, columns, alpha, accumulate, c, ldc);
  } else {
    dot_tile_columns<kRows, false>(pairs, a, a_row, a_pair, b, columns, alpha, accumulate, c, ldc);
  }
}

#endif  // ATTNKERNELS_CPU_AVX512 (bfloat16)

// ----------------------------------------------------------------------------- float32

// Packs B (k x n, row stride ld) into panels: word (p, j) = X[p][j]. out: k * packed_width(n) floats.
inline void pack_floats_from_columns(const float* x, int64_t k, int64_t n, int64_t ld, float* out) {
  for (int64_t p = 0; p < k; ++p) {
    for (int64_t j = 0; j < n; j += kDotColumns) {
      const int64_t count = std::min<int64_t>(kDotColumns, n - j);
      float* to = out + packed_index(k, p, j);
      if (count == kDotColumns) {
        std::memcpy(to, x + p * ld + j, kDotColumns * sizeof(float));  // a fixed size: vector moves
      } else {
        std::copy(x + p * ld + j, x + p * ld + j + count, to);
      }
    }
  }
}

inline void pack_floats_from_rows(const float* x, int64_t n, int64_t k, int64_t ld, float* out) {
  pack_words_from_rows(x, n, k, ld, reinterpret_cast<uint32_t*>(out));
}

// C (kRows x up to kDotColumns columns) = alpha * A B (+ C when accumulate); b: the panel (k rows
// of kDotColumns). The second vector of columns is used only when kBothVectors.
template <int kRows, bool kBothVectors>
ATTNKERNELS_ALWAYS_INLINE void fma_tile_columns(int64_t k, const float* a, int64_t a_row, int64_t a_step,
                                                const float* b, int64_t columns, float alpha, bool accumulate, float* c,
                                                int64_t ldc) {
#if defined(ATTNKERNELS_CPU_AVX512)
  __m512 acc[kRows][2];
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  TileRows<kRows> rows(a, a_row);
  for (int64_t p = 0; p < k; ++p) {
    const __m512 b0 = _mm512_loadu_ps(b);
    const __m512 b1 = kBothVectors ? _mm512_loadu_ps(b + 16) : b0;
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const __m512 ar = _mm512_set1_ps(*rows.row(r));
      acc[r][0] = _mm512_fmadd_ps(ar, b0, acc[r][0]);
      if (kBothVectors) acc[r][1] = _mm512_fmadd_ps(ar, b1, acc[r][1]);
    }
    b += kDotColumns;
    rows.step(a_step);
  }
#else
  __m256 acc[kRows][2];
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  TileRows<kRows> rows(a, a_row);
  for (int64_t p = 0; p < k; ++p) {
    const __m256 b0 = _mm256_loadu_ps(b);
    const __m256 b1 = kBothVectors ? _mm256_loadu_ps(b + 8) : b0;
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const __m256 ar = _mm256_broadcast_ss(rows.row(r));
      acc[r][0] = _mm256_fmadd_ps(ar, b0, acc[r][0]);
      if (kBothVectors) acc[r][1] = _mm256_fmadd_ps(ar, b1, acc[r][1]);
    }
    b += kDotColumns;
    rows.step(a_step);
  }
#endif
  store_tile<kRows>(acc, columns, alpha, accumulate, c, ldc);
}

template <int kRows>
void fma_tile(int64_t k, const float* a, int64_t a_row, int64_t a_step, const float* b, int64_t columns, float alpha,
              bool accumulate, float* c, int64_t ldc) {
  if (columns > kDotColumns / 2) {
    fma_tile_columns<kRows, true>(k, a, a_row, a_step, b, columns, alpha, accumulate, c, ldc);
  } else {
    fma_tile_columns<kRows, false>(k, a, a_row, a_step, b, columns, alpha, accumulate, c, ldc);
  }
}

// ----------------------------------------------------------------------------- the products

// Which part of a product a causal mask makes useless. The mask hides (query i, key j) for
// j > i + offset; the three cases are the attention tiles' products:
// - kColumnsAfter: C's rows are queries and its columns keys (Q K^T, dO V^T). Register tiles
//   wholly right of the diagonal are not computed, nor a tile's columns right of its last row's
//   diagonal, and C keeps what it held there (the caller masks those entries).
// - kReductionAfter: C's rows are queries and the reduction runs over keys (P V, dS K), whose
//   hidden terms are zero: each register tile stops at its last row's diagonal.
// - kReductionBefore: C's rows are keys and the reduction runs over queries (P^T dO, dS^T Q),
//   whose hidden terms (query p < key i - offset) are zero: each register tile starts at its
//   first row's diagonal.
enum class CausalSkip { kNone, kColumnsAfter, kReductionAfter, kReductionBefore };
struct Skip {
  CausalSkip kind = CausalSkip::kNone;
  int64_t offset = 0;
};

// How many entries of a query row past its causal diagonal a skipping product reads from its left
// operand (they must be 0): a register tile's reduction ends at its last row's diagonal or starts at
// its first row's, rounded to whole pairs of bfloat16.
constexpr int64_t kDotReadsPastDiagonal = kDotRows;

// The register tiles of each element type, for tile_product.
#if defined(ATTNKERNELS_CPU_AVX512)
struct DotTile {
  template <int kRows>
  ATTNKERNELS_BF16_TARGET void run(int64_t pairs, const c10::BFloat16* a, int64_t a_row, int64_t a_pair,
                                   const uint32_t* b, int64_t columns, float alpha, bool accumulate, float* c,
                                   int64_t ldc) const {
    dot_tile<kRows>(pairs, a, a_row, a_pair, b, columns, alpha, accumulate, c, ldc);
  }
};
#endif
struct FmaTile {
  template <int kRows>
  void run(int64_t k, const float* a, int64_t a_row, int64_t a_step, const float* b, int64_t columns, float alpha,
           bool accumulate, float* c, int64_t ldc) const {
    fma_tile<kRows>(k, a, a_row, a_step, b, columns, alpha, accumulate, c, ldc);
  }
};

// The tile of `rows` rows (1 to kRows).
template <int kRows, typename Tile, typename... Args>
void run_tile(Tile tile, int64_t rows, Args... args) {
  if constexpr (kRows > 1) {
    if (rows < kRows) return run_tile<kRows - 1>(tile, rows, args...);
  }
  tile.template run<kRows>(args...);
}

// C (m x n, float32, row stride ldc) = alpha * A B (+ C when accumulate), the reduction over
// `steps` packed words (pairs of bfloat16, or floats: per_word elements each). A(i, p) starts at
// a + i * a_row + p * a_step; b is a packed B of `steps` rows and n columns.
template <typename Tile, typename A, typename B>
void tile_product(Tile tile, int64_t per_word, int64_t m, int64_t n, int64_t steps, const A* a, int64_t a_row,
                  int64_t a_step, const B* b, float alpha, bool accumulate, float* c, int64_t ldc, Skip skip) {
  for (int64_t j = 0; j < n; j += kDotColumns) {
    const int64_t columns = std::min<int64_t>(kDotColumns, n - j);
    for (int64_t i = 0; i < m; i += kDotRows) {
      const int64_t rows = std::min<int64_t>(kDotRows, m - i);
      int64_t tile_columns = columns;
      if (skip.kind == CausalSkip::kColumnsAfter) {
        // Only as far as the tile's last row sees: a panel the diagonal cuts within its first
        // half takes the one-vector tile.
        tile_columns = std::min(columns, i + rows + skip.offset - j);
        if (tile_columns <= 0) continue;
      }
      const int64_t first =
          skip.kind == CausalSkip::kReductionBefore ? std::min(steps, std::max<int64_t>(0, i - skip.offset) / per_word) : 0;
      const B* panel = b + packed_index(steps, first, j);
      int64_t count = steps - first;
      if (skip.kind == CausalSkip::kReductionAfter) {
        count = std::min(count, (std::max<int64_t>(0, i + rows + skip.offset) + per_word - 1) / per_word);
      }
      if (count == 0 && accumulate) continue;
      const A* a_i = a + i * a_row + first * a_step;
      float* c_i = c + i * ldc + j;
      run_tile<kDotRows>(tile, rows, count, a_i, a_row, a_step, panel, tile_columns, alpha, accumulate, c_i, ldc);
    }
  }
}

#if defined(ATTNKERNELS_CPU_AVX512)
// bfloat16: the reduction over `pairs` pairs; A(i, p) is the pair of bfloat16 at
// a + i * a_row + p * a_pair (in elements).
inline void dot_product(int64_t m, int64_t n, int64_t pairs, const c10::BFloat16* a, int64_t a_row, int64_t a_pair,
                        const uint32_t* b, float alpha, bool accumulate, float* c, int64_t ldc, Skip skip = {}) {
  tile_product(DotTile{}, 2, m, n, pairs, a, a_row, a_pair, b, alpha, accumulate, c, ldc, skip);
}

#endif

// float32: the reduction over k; A(i, p) is a[i * a_row + p * a_step]; b from
// pack_floats_from_columns / _rows.
inline void fma_product(int64_t m, int64_t n, int64_t k, const float* a, int64_t a_row, int64_t a_step,
                        const float* b, float alpha, bool accumulate, float* c, int64_t ldc, Skip skip = {}) {
  tile_product(FmaTile{}, 1, m, n, k, a, a_row, a_step, b, alpha, accumulate, c, ldc, skip);
}

// ----------------------------------------------------------------------------- one interface

// A left operand: A(i, p) for element p of the reduction at data + i * row + (p / w) * step + p % w,
// w = kPerWord<T> (a bfloat16 pair is read as one word, so step counts elements per word step).
template <typename T>
struct LeftOperand {
  const T* data;
  int64_t row, step;
};

// The products above behind one interface per element type, for code templated on it (the
// attention tiles): T = c10::BFloat16 (dot products; packed words are pairs) or float (FMAs).
template <typename T>
struct DotOps;

#if defined(ATTNKERNELS_CPU_AVX512)
template <>
struct DotOps<c10::BFloat16> {
  using T = c10::BFloat16;
  using Word = uint32_t;
  static int64_t packed_size(int64_t k, int64_t n) { return attnkernels::cpu::packed_size(k, n); }
  // X (n x k) whose rows run along the reduction; k even for rows used in place as left operands.
  static void pack_rows(const T* x, int64_t n, int64_t k, int64_t ld, Word* out) {
    pack_pairs_from_rows(x, n, k, ld, out);
  }
  template <typename Source>
  static void pack_columns(const Source* x, int64_t k, int64_t n, int64_t ld, Word* out) {
    pack_pairs_from_columns(x, k, n, ld, out);
  }
  // Rows (m x k, k even) used as they are.
  static LeftOperand<T> rows(const T* x, int64_t ld) { return {x, ld, 2}; }
  // float32 rows (m x k), rounded into `buffer` (left_buffer_size(m, k) elements).
  static int64_t left_buffer_size(int64_t m, int64_t k) { return m * left_row_stride(k); }
  static LeftOperand<T> rounded(const float* x, int64_t m, int64_t k, int64_t ld, T* buffer) {
    round_rows(x, m, k, ld, buffer);
    return rounded_rows(buffer, k);
  }
  // The rows of k elements that `rounded` writes into `buffer`, written there by other means: row
  // stride left_row_stride(k), an odd row's last element (its pad) 0.
  static int64_t left_row_stride(int64_t k) { return 2 * pair_count(k); }
  static LeftOperand<T> rounded_rows(const T* buffer, int64_t k) { return {buffer, left_row_stride(k), 2}; }
  // The transpose of X (k x m): A(i, p) = X[p][i], packed into `buffer` (transposed_buffer_size words).
  static int64_t transposed_buffer_size(int64_t k, int64_t m) { return packed_size(k, m); }
  template <typename Source>
  static LeftOperand<T> transposed(const Source* x, int64_t k, int64_t m, int64_t ld, Word* buffer) {
    pack_pairs_from_columns(x, k, m, ld, buffer, PairLayout::kRows);
    return {reinterpret_cast<const T*>(buffer), 2, 2 * packed_width(m)};
  }
  static void product(int64_t m, int64_t n, int64_t k, LeftOperand<T> a, const Word* b, float alpha, bool accumulate,
                      float* c, int64_t ldc, Skip skip = {}) {
    dot_product(m, n, pair_count(k), a.data, a.row, a.step, b, alpha, accumulate, c, ldc, skip);
  }
};

#endif

template <>
struct DotOps<float> {
  using T = float;
  using Word = float;
  static int64_t packed_size(int64_t k, int64_t n) { return k * packed_width(n); }
  static void pack_rows(const T* x, int64_t n, int64_t k, int64_t ld, Word* out) {
    pack_floats_from_rows(x, n, k, ld, out);
  }
  static void pack_columns(const float* x, int64_t k, int64_t n, int64_t ld, Word* out) {
    pack_floats_from_columns(x, k, n, ld, out);
  }
  static LeftOperand<T> rows(const T* x, int64_t ld) { return {x, ld, 1}; }
  static int64_t left_buffer_size(int64_t, int64_t) { return 0; }
  static LeftOperand<T> rounded(const float* x, int64_t, int64_t, int64_t ld, T*) { return {x, ld, 1}; }
  // Read in place: no buffer.
  static int64_t transposed_buffer_size(int64_t, int64_t) { return 0; }
  static LeftOperand<T> transposed(const T* x, int64_t, int64_t, int64_t ld, Word*) { return {x, 1, ld}; }
  static void product(int64_t m, int64_t n, int64_t k, LeftOperand<T> a, const Word* b, float alpha, bool accumulate,
                      float* c, int64_t ldc, Skip skip = {}) {
    fma_product(m, n, k, a.data, a.row, a.step, b, alpha, accumulate, c, ldc, skip);
  }
};

}  // namespace ATTNKERNELS_CPU_ISA
}  // namespace cpu
}  // namespace attnkernels

#endif  // ATTNKERNELS_CPU_AVX512 || ATTNKERNELS_CPU_AVX2
