// Products of the CPU attention (forward and backward) for a few query rows, on keys and values read
// where they lie (avx2 and avx512 variants).
//
// With one to a handful of query rows per head (attention pooling, a class token attending to the
// patches, decoding) every key and value is used by those few rows only: packing them into panels
// for the register tiles of dot_tiles.h would write and read them once more for a few flops each,
// and a register tile of one row spends one broadcast per FMA. Here the scores come from dot
// products of the query rows with each key row, vectorised along the head dimension (4 keys at a
// time, reduced together), and the values are added row by row into accumulators that stay in
// registers. The backward's products for those rows read keys and values the same way, and add the
// key and value gradients key by key. float32, bfloat16 and float16 inputs; the arithmetic is float32.
#pragma once

#include "../cpu_isa.h"

#if defined(ATTNKERNELS_CPU_AVX512) || defined(ATTNKERNELS_CPU_AVX2)
#define ATTNKERNELS_DIRECT_TILES 1
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace attnkernels {
namespace cpu {
inline namespace ATTNKERNELS_CPU_ISA {  // see cpu_isa.h

// One vector of float32 lanes, loaded from float32, bfloat16 or float16.
struct Lanes {
#if defined(ATTNKERNELS_CPU_AVX512)
  using V = __m512;
  static constexpr int64_t kWidth = 16;
  static ATTNKERNELS_ALWAYS_INLINE V zero() { return _mm512_setzero_ps(); }
  static ATTNKERNELS_ALWAYS_INLINE V set1(float x) { return _mm512_set1_ps(x); }
  static ATTNKERNELS_ALWAYS_INLINE V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static ATTNKERNELS_ALWAYS_INLINE V load(const float* p) { return _mm512_loadu_ps(p); }
  static ATTNKERNELS_ALWAYS_INLINE V load(const c10::BFloat16* p) {
    const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
  }
  static ATTNKERNELS_ALWAYS_INLINE V load(const c10::Half* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  // The first n (< kWidth) elements, the other lanes 0; nothing past them is read.
  static ATTNKERNELS_ALWAYS_INLINE V load(const float* p, int64_t n) {
    return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1u), p);
  }
  static ATTNKERNELS_ALWAYS_INLINE V load(const c10::BFloat16* p, int64_t n) {
    const __m256i bits = _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << n) - 1u), p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
  }
  static ATTNKERNELS_ALWAYS_INLINE V load(const c10::Half* p, int64_t n) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << n) - 1u), p));
  }
  static ATTNKERNELS_ALWAYS_INLINE void store(float* p, V x) { _mm512_storeu_ps(p, x); }
  static ATTNKERNELS_ALWAYS_INLINE void store(float* p, V x, int64_t n) {
    _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1u), x);
  }
  // The 8 lanes of (x's low half + its high half).
  static ATTNKERNELS_ALWAYS_INLINE __m256 halves(V x) {
    return _mm256_add_ps(_mm512_castps512_ps256(x), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
  }
#else
  using V = __m256;
  static constexpr int64_t kWidth = 8;
  static ATTNKERNELS_ALWAYS_INLINE V zero() { return _mm256_setzero_ps(); }
  static ATTNKERNELS_ALWAYS_INLINE V set1(float x) { return _mm256_set1_ps(x); }
  static ATTNKERNELS_ALWAYS_INLINE V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static ATTNKERNELS_ALWAYS_INLINE V load(const float* p) { return _mm256_loadu_ps(p); }
  static ATTNKERNELS_ALWAYS_INLINE V load(const c10::BFloat16* p) {
    const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
  }
  static ATTNKERNELS_ALWAYS_INLINE V load(const c10::Half* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static ATTNKERNELS_ALWAYS_INLINE __m256i first_lanes(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static ATTNKERNELS_ALWAYS_INLINE V load(const float* p, int64_t n) { return _mm256_maskload_ps(p, first_lanes(n)); }
  // 16-bit elements have no masked load before AVX-512: through a zero-padded copy.
  template <typename T>
  static ATTNKERNELS_ALWAYS_INLINE V load(const T* p, int64_t n) {
    T padded[kWidth] = {};
    std::memcpy(padded, p, static_cast<size_t>(n) * sizeof(T));
    return load(static_cast<const T*>(padded));
  }
  static ATTNKERNELS_ALWAYS_INLINE void store(float* p, V x) { _mm256_storeu_ps(p, x); }
  static ATTNKERNELS_ALWAYS_INLINE void store(float* p, V x, int64_t n) { _mm256_maskstore_ps(p, first_lanes(n), x); }
  static ATTNKERNELS_ALWAYS_INLINE __m256 halves(V x) { return x; }
#endif
  // (sum of a's lanes, b's, c's, d's).
  static ATTNKERNELS_ALWAYS_INLINE __m128 sums(V a, V b, V c, V d) {
    const __m256 ab = _mm256_hadd_ps(halves(a), halves(b));  // a01 a23 b01 b23 | a45 a67 b45 b67
    const __m256 cd = _mm256_hadd_ps(halves(c), halves(d));
    const __m256 abcd = _mm256_hadd_ps(ab, cd);  // a0123 b0123 c0123 d0123 | a4567 b4567 c4567 d4567
    return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
  }
};

// Query rows a product takes at once: their accumulators and a vector of each of 4 keys fill the
// registers (32 zmm, 16 ymm).
#if defined(ATTNKERNELS_CPU_AVX512)
constexpr int kDirectRows = 4;
#else
constexpr int kDirectRows = 2;
#endif
// Keys of one step of the score products.
constexpr int kDirectKeys = 4;
// Vectors of value columns the value products keep in registers per row.
constexpr int kDirectValueVectors = 4;

// Rows another product reads next (the values after the scores), prefetched into L2 while the
// scores stream the keys: both streams in flight at once, where the scores alone would leave
// memory idle between the keys of one head and the values.
struct RowsToPrefetch {
  const char* base = nullptr;  // contiguous rows of row_bytes
  int64_t row_bytes = 0;
  ATTNKERNELS_ALWAYS_INLINE void rows(int64_t first, int64_t count) const {
    if (base == nullptr) return;
    const char* end = base + (first + count) * row_bytes;
    for (const char* line = base + first * row_bytes; line < end; line += 64) _mm_prefetch(line, _MM_HINT_T1);
  }
};

// The rows of `cols` values (row length Ev) as RowsToPrefetch, or none when they would not sit in
// L2 (a quarter of Zen 3's 512 KiB) until they are read.
template <typename T>
inline RowsToPrefetch values_to_prefetch(const T* v, int64_t Ev, int64_t cols) {
  constexpr int64_t kMostBytes = int64_t(128) << 10;
  const int64_t row_bytes = Ev * int64_t(sizeof(T));
  if (cols * row_bytes > kMostBytes) return {};
  return {reinterpret_cast<const char*>(v), row_bytes};
}

// out[r][j] = alpha * (q_r . k_j) for kRows query rows (float32, row stride q_ld, E elements and
// zeros to a multiple of Lanes::kWidth) and keys [0, cols) (rows of k, stride E); the rows of
// `prefetch` of those keys prefetched on the way.
template <int kRows, typename T>
void direct_scores(const float* q, int64_t q_ld, const T* k, int64_t E, int64_t cols, float alpha, float* out,
                   int64_t ld, RowsToPrefetch prefetch = {}) {
  using V = Lanes::V;
  constexpr int64_t W = Lanes::kWidth;
  const int64_t whole = E / W * W, rest = E - whole;
  const __m128 alpha4 = _mm_set1_ps(alpha);
  int64_t j = 0;
  for (; j < cols; j += kDirectKeys) {
    prefetch.rows(j, std::min<int64_t>(kDirectKeys, cols - j));
    // A last step of fewer keys repeats its last key in the missing ones and stores only its own.
    const T* key[kDirectKeys];
    for (int i = 0; i < kDirectKeys; ++i) key[i] = k + std::min(j + i, cols - 1) * E;
    V acc[kRows][kDirectKeys];
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 4
      for (int i = 0; i < kDirectKeys; ++i) acc[r][i] = Lanes::zero();
    }
    for (int64_t e = 0; e < whole; e += W) {
      V kv[kDirectKeys];
#pragma GCC unroll 4
      for (int i = 0; i < kDirectKeys; ++i) kv[i] = Lanes::load(key[i] + e);
#pragma GCC unroll 4
      for (int r = 0; r < kRows; ++r) {
        const V qv = Lanes::load(q + r * q_ld + e);
#pragma GCC unroll 4
        for (int i = 0; i < kDirectKeys; ++i) acc[r][i] = Lanes::fmadd(qv, kv[i], acc[r][i]);
      }
    }
    if (rest > 0) {
      V kv[kDirectKeys];
#pragma GCC unroll 4
      for (int i = 0; i < kDirectKeys; ++i) kv[i] = Lanes::load(key[i] + whole, rest);
#pragma GCC unroll 4
      for (int r = 0; r < kRows; ++r) {
        const V qv = Lanes::load(q + r * q_ld + whole);
#pragma GCC unroll 4
        for (int i = 0; i < kDirectKeys; ++i) acc[r][i] = Lanes::fmadd(qv, kv[i], acc[r][i]);
      }
    }
    const int64_t keys = std::min<int64_t>(kDirectKeys, cols - j);
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) {
      const __m128 s = _mm_mul_ps(Lanes::sums(acc[r][0], acc[r][1], acc[r][2], acc[r][3]), alpha4);
      if (keys == kDirectKeys) {
        _mm_storeu_ps(out + r * ld + j, s);
      } else {
        float four[kDirectKeys];
        _mm_storeu_ps(four, s);
        std::copy(four, four + keys, out + r * ld + j);
      }
    }
  }
}

// accum[r][e0:e0 + n) += alpha * sum_j p[r][j] * v[j][e0:e0 + n) for kRows rows and keys [0, cols), n up
// to kVectors * Lanes::kWidth columns (the last vector may be partial); v rows of stride Ev.
template <int kRows, int kVectors, typename T>
void direct_values_columns(const float* p, int64_t ld, const T* v, int64_t Ev, int64_t e0, int64_t n, int64_t cols,
                           float alpha, float* accum) {
  using V = Lanes::V;
  constexpr int64_t W = Lanes::kWidth;
  const int64_t last = n - (kVectors - 1) * W;  // columns of the last vector, 1 to W
  V acc[kRows][kVectors];
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 4
    for (int s = 0; s < kVectors; ++s) {
      acc[r][s] = s + 1 < kVectors || last == W ? Lanes::load(accum + r * Ev + e0 + s * W)
                                                : Lanes::load(accum + r * Ev + e0 + s * W, last);
    }
  }
  const T* row = v + e0;
  if (last == W) {
    for (int64_t j = 0; j < cols; ++j, row += Ev) {
      V vv[kVectors];
#pragma GCC unroll 4
      for (int s = 0; s < kVectors; ++s) vv[s] = Lanes::load(row + s * W);
#pragma GCC unroll 4
      for (int r = 0; r < kRows; ++r) {
        const V pr = Lanes::set1(alpha * p[r * ld + j]);
#pragma GCC unroll 4
        for (int s = 0; s < kVectors; ++s) acc[r][s] = Lanes::fmadd(pr, vv[s], acc[r][s]);
      }
    }
  } else {
    for (int64_t j = 0; j < cols; ++j, row += Ev) {
      V vv[kVectors];
#pragma GCC unroll 4
      for (int s = 0; s < kVectors; ++s) vv[s] = s + 1 < kVectors ? Lanes::load(row + s * W) : Lanes::load(row + s * W, last);
#pragma GCC unroll 4
      for (int r = 0; r < kRows; ++r) {
        const V pr = Lanes::set1(alpha * p[r * ld + j]);
#pragma GCC unroll 4
        for (int s = 0; s < kVectors; ++s) acc[r][s] = Lanes::fmadd(pr, vv[s], acc[r][s]);
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 4
    for (int s = 0; s < kVectors; ++s) {
      if (s + 1 < kVectors || last == W) {
        Lanes::store(accum + r * Ev + e0 + s * W, acc[r][s]);
      } else {
        Lanes::store(accum + r * Ev + e0 + s * W, acc[r][s], last);
      }
    }
  }
}

// accum (kRows x Ev, contiguous) += alpha * p (kRows x cols, row stride ld) times v (cols x Ev).
template <int kRows, typename T>
void direct_values(const float* p, int64_t ld, const T* v, int64_t Ev, int64_t cols, float* accum,
                   float alpha = 1.0f) {
  constexpr int64_t W = Lanes::kWidth;
  for (int64_t e0 = 0; e0 < Ev; e0 += kDirectValueVectors * W) {
    const int64_t n = std::min(Ev - e0, kDirectValueVectors * W);
    switch ((n + W - 1) / W) {
      case 1: direct_values_columns<kRows, 1>(p, ld, v, Ev, e0, n, cols, alpha, accum); break;
      case 2: direct_values_columns<kRows, 2>(p, ld, v, Ev, e0, n, cols, alpha, accum); break;
      case 3: direct_values_columns<kRows, 3>(p, ld, v, Ev, e0, n, cols, alpha, accum); break;
      default: direct_values_columns<kRows, 4>(p, ld, v, Ev, e0, n, cols, alpha, accum); break;
    }
  }
}

// out[j][e0:e0 + kVectors * W) += alpha * sum_r w[r][j] * x[r][e0:...) for keys [0, cols): x rows (stride
// x_ld) and out rows (stride out_ld) both padded to whole vectors.
template <int kRows, int kVectors>
void direct_outer_columns(const float* w, int64_t ld, const float* x, int64_t x_ld, int64_t e0, int64_t cols,
                          float alpha, float* out, int64_t out_ld) {
  using V = Lanes::V;
  constexpr int64_t W = Lanes::kWidth;
  V xv[kRows][kVectors];
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 4
    for (int s = 0; s < kVectors; ++s) xv[r][s] = Lanes::load(x + r * x_ld + e0 + s * W);
  }
  float* row = out + e0;
  for (int64_t j = 0; j < cols; ++j, row += out_ld) {
    V acc[kVectors];
#pragma GCC unroll 4
    for (int s = 0; s < kVectors; ++s) acc[s] = Lanes::load(row + s * W);
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) {
      const V wr = Lanes::set1(alpha * w[r * ld + j]);
#pragma GCC unroll 4
      for (int s = 0; s < kVectors; ++s) acc[s] = Lanes::fmadd(wr, xv[r][s], acc[s]);
    }
#pragma GCC unroll 4
    for (int s = 0; s < kVectors; ++s) Lanes::store(row + s * W, acc[s]);
  }
}

// out (cols x n, row stride out_ld) += alpha * w^T x: w (kRows x cols, row stride ld), x (kRows x n, row stride
// x_ld); n, x_ld and out_ld multiples of Lanes::kWidth (x's padding read, out's written).
template <int kRows>
void direct_outer(const float* w, int64_t ld, const float* x, int64_t x_ld, int64_t n, int64_t cols, float alpha,
                  float* out, int64_t out_ld) {
  constexpr int64_t W = Lanes::kWidth;
  for (int64_t e0 = 0; e0 < n; e0 += kDirectValueVectors * W) {
    switch (std::min<int64_t>(kDirectValueVectors, (n - e0) / W)) {
      case 1: direct_outer_columns<kRows, 1>(w, ld, x, x_ld, e0, cols, alpha, out, out_ld); break;
      case 2: direct_outer_columns<kRows, 2>(w, ld, x, x_ld, e0, cols, alpha, out, out_ld); break;
      case 3: direct_outer_columns<kRows, 3>(w, ld, x, x_ld, e0, cols, alpha, out, out_ld); break;
      default: direct_outer_columns<kRows, 4>(w, ld, x, x_ld, e0, cols, alpha, out, out_ld); break;
    }
  }
}

// n rounded up to whole vectors.
inline int64_t direct_padded(int64_t n) { return (n + Lanes::kWidth - 1) / Lanes::kWidth * Lanes::kWidth; }

}  // namespace ATTNKERNELS_CPU_ISA
}  // namespace cpu
}  // namespace attnkernels

#endif  // ATTNKERNELS_CPU_AVX512 || ATTNKERNELS_CPU_AVX2
