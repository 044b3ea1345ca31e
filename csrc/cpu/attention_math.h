// Building blocks of the CPU flash-attention kernels: row-major GEMM on tiles
// (the BLAS that torch ships, with a plain-loop fallback), an exp that the
// compiler vectorises, and the counter-based dropout generator.
#pragma once

#include "../cpu_isa.h"
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

// The Fortran BLAS entry points that libtorch_cpu exports (MKL on x86 wheels).
// Declared weak so that a torch built without a BLAS still loads this library;
// the kernels then use the loop fallback below.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace attnkernels {
namespace cpu {
inline namespace ATTNKERNELS_CPU_ISA {  // see cpu_isa.h

// Plain loops, only for a torch without BLAS symbols.
template <typename T>
void gemm_loops(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
                const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) {
    T* c_row = c + i * ldc;
    for (int64_t j = 0; j < n; ++j) c_row[j] = beta == T(0) ? T(0) : beta * c_row[j];
    for (int64_t p = 0; p < k; ++p) {
      const T a_ip = alpha * (trans_a ? a[p * lda + i] : a[i * lda + p]);
      if (trans_b) {
        for (int64_t j = 0; j < n; ++j) c_row[j] += a_ip * b[j * ldb + p];
      } else {
        const T* b_row = b + p * ldb;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) c_row[j] += a_ip * b_row[j];
      }
    }
  }
}

// Row-major C (m x n) = alpha * op(A) (m x k) * op(B) (k x n) + beta * C, where
// op(X) is X or X^T as trans_* says. Row-major C is column-major C^T = op(B)^T op(A)^T,
// so the column-major BLAS is called with the operands swapped.
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
          int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {  // BLAS rejects leading dimensions of 0; the product is empty
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == T(0) ? T(0) : beta * c[i * ldc + j];
    return;
  }
  const int mi = static_cast<int>(m), ni = static_cast<int>(n), ki = static_cast<int>(k);
  const int ldai = static_cast<int>(lda), ldbi = static_cast<int>(ldb), ldci = static_cast<int>(ldc);
  const char* op_a = trans_a ? "T" : "N";
  const char* op_b = trans_b ? "T" : "N";
  if constexpr (std::is_same_v<T, float>) {
    if (sgemm_ != nullptr) {
      sgemm_(op_b, op_a, &ni, &mi, &ki, &alpha, b, &ldbi, a, &ldai, &beta, c, &ldci);
      return;
    }
  } else if constexpr (std::is_same_v<T, double>) {
    if (dgemm_ != nullptr) {
      dgemm_(op_b, op_a, &ni, &mi, &ki, &alpha, b, &ldbi, a, &ldai, &beta, c, &ldci);
      return;
    }
  }
  gemm_loops(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// The units the kernels keep attention scores in. Base 2 (log2(e) folded into the scale of
// Q K^T) makes each softmax exp an exp2 with nothing to multiply: about a quarter off the exp pass.
// An additive float mask keeps them natural: the mask is added as given (a mask at the float's
// lowest, a common "hidden" value, must stay finite) and the exp pass multiplies the difference
// to the row maximum by log2(e).
template <typename T>
struct ScoreUnits {
  T scale;       // scores = scale * Q K^T (+ mask)
  T to_log2;     // 2^((score - max) * to_log2) is the probability
  T to_natural;  // a score (or maximum) times to_natural is in natural units
  T per_natural;  // a natural value (lse) times per_natural is in score units

  ScoreUnits(double softmax_scale, bool natural) {
    const double log2e = 1.4426950408889634;
    const double per = natural ? 1.0 : log2e;
    scale = static_cast<T>(softmax_scale * per);
    to_log2 = static_cast<T>(log2e / per);
    to_natural = static_cast<T>(1.0 / per);
    per_natural = static_cast<T>(per);
  }
};

// The softmax's exp is 2^x = 2^n 2^r with n = round(x) and r = x - n in [-1/2, 1/2]; 2^r is this
// degree-6 polynomial, fitted for the least relative error on that interval (2e-9; under 1e-7
// once evaluated in float32). It takes about a tenth of a float32 attention forward at head dim
// 64, so it is written for few instructions.
constexpr float kExp2Poly[7] = {1.0000000005541467f,   0.6931472057373622f,   0.24022646890809202f,
                                0.055503287768143734f, 0.009618488938061762f, 0.0013399931267811006f,
                                0.00015345817148013433f};

// 2^x for x <= 0 (a score minus its row maximum or lse, in units of log2), written so that
// `#pragma omp simd` loops vectorise it. x is clamped to [-127, 127]: at -127 and below 2^n is 0
// (which covers -inf); NaN stays NaN.
inline float exp2_nonpositive(float x) {
  const float clamped = std::min(std::max(x, -127.0f), 127.0f);
  const float n = std::floor(clamped + 0.5f);
  const float r = clamped - n;
  float p = kExp2Poly[6];
  for (int i = 5; i >= 0; --i) p = p * r + kExp2Poly[i];
  // 2^n from its exponent bits (0 for n = -127); memcpy, not std::bit_cast: torch 2.11 builds
  // extensions as C++17.
  const int32_t exponent_bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_to_n;
  std::memcpy(&two_to_n, &exponent_bits, sizeof(two_to_n));
  return p * two_to_n;
}

// Double precision keeps the library exp2: float64 results are checked to 1e-8.
inline double exp2_nonpositive(double x) { return std::exp2(x); }

// Row reductions of the softmax, vectorised. The generic versions are plain
// loops; with AVX-512 or AVX2 + FMA the float ones use intrinsics (GCC does not
// vectorise the bit tricks of exp2_nonpositive reliably).

// The maximum, or NaN if any value is NaN (a NaN input must show in the output,
// not be taken for a fully masked row).
template <typename T>
T max_of(const T* values, int64_t n) {
  T result = -std::numeric_limits<T>::infinity();
  bool nan_seen = false;
  for (int64_t i = 0; i < n; ++i) {
    result = std::max(result, values[i]);
    nan_seen |= values[i] != values[i];
  }
  return nan_seen ? std::numeric_limits<T>::quiet_NaN() : result;
}

// values[i] = 2^((values[i] - shift) * to_log2) for values <= shift (see ScoreUnits); returns
// their sum.
template <typename T>
T exp2_shifted_sum(T* values, int64_t n, T shift, T to_log2) {
  T sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    const T p = exp2_nonpositive((values[i] - shift) * to_log2);
    values[i] = p;
    sum += p;
  }
  return sum;
}

#if defined(__AVX512F__)
// 2^x on 16 lanes (see exp2_nonpositive): scalef makes p 2^n, and x is clamped to [-150, 127]
// instead, so that 2^n underflows to 0 (-150 and below, -inf too) through the denormals. NaN stays
// NaN: max and min return their second operand when one is NaN.
inline __m512 exp2_nonpositive16(__m512 x) {
  const __m512 clamped = _mm512_min_ps(_mm512_set1_ps(127.0f), _mm512_max_ps(_mm512_set1_ps(-150.0f), x));
  const __m512 n = _mm512_roundscale_ps(clamped, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_sub_ps(clamped, n);
  __m512 p = _mm512_set1_ps(kExp2Poly[6]);
  for (int i = 5; i >= 0; --i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExp2Poly[i]));
  return _mm512_scalef_ps(p, n);
}

inline __mmask16 tail_mask(int64_t remaining) { return static_cast<__mmask16>((1u << remaining) - 1u); }

template <>
inline float max_of<float>(const float* values, int64_t n) {
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 result = neg_inf;
  __mmask16 nan_seen = 0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 x = _mm512_loadu_ps(values + i);
    nan_seen |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    result = _mm512_max_ps(result, x);
  }
  if (i < n) {
    const __m512 x = _mm512_mask_loadu_ps(neg_inf, tail_mask(n - i), values + i);
    nan_seen |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    result = _mm512_max_ps(result, x);
  }
  return nan_seen ? std::numeric_limits<float>::quiet_NaN() : _mm512_reduce_max_ps(result);
}

// The exp pass for scores in units of log2 (kNatural false) or natural ones.
template <bool kNatural>
inline float exp2_shifted_sum16(float* values, int64_t n, float shift, float to_log2) {
  const __m512 shift16 = _mm512_set1_ps(shift), to_log2_16 = _mm512_set1_ps(to_log2);
  const auto exponent = [&](__m512 x) {
    const __m512 difference = _mm512_sub_ps(x, shift16);
    return kNatural ? _mm512_mul_ps(difference, to_log2_16) : difference;
  };
  __m512 sum = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 p = exp2_nonpositive16(exponent(_mm512_loadu_ps(values + i)));
    _mm512_storeu_ps(values + i, p);
    sum = _mm512_add_ps(sum, p);
  }
  if (i < n) {
    const __mmask16 mask = tail_mask(n - i);
    const __m512 p = exp2_nonpositive16(exponent(_mm512_maskz_loadu_ps(mask, values + i)));
    _mm512_mask_storeu_ps(values + i, mask, p);
    sum = _mm512_mask_add_ps(sum, mask, sum, p);
  }
  return _mm512_reduce_add_ps(sum);
}

template <>
inline float exp2_shifted_sum<float>(float* values, int64_t n, float shift, float to_log2) {
  return to_log2 == 1.0f ? exp2_shifted_sum16<false>(values, n, shift, to_log2)
                         : exp2_shifted_sum16<true>(values, n, shift, to_log2);
}

#if defined(ATTNKERNELS_BF16_TARGET)
// The exp pass of exp2_shifted_sum for probabilities that only a bfloat16 product reads: they go
// to `rounded` (bfloat16 bits, rounded to nearest even) instead of back over the scores, which
// are left as they were; the sum is of the float32 values, as exp2_shifted_sum's. One pass where
// the exp pass and a rounding pass took two. exp2_shifted_sum16's loop again: the conversion
// compiles only in a function that carries the AVX512-BF16 target, which the float32 pass must not.
template <bool kNatural>
ATTNKERNELS_BF16_TARGET inline float exp2_shifted_sum16_rounded(const float* values, int64_t n, float shift,
                                                                float to_log2, uint16_t* rounded) {
  const __m512 shift16 = _mm512_set1_ps(shift), to_log2_16 = _mm512_set1_ps(to_log2);
  const auto exponent = [&](__m512 x) {
    const __m512 difference = _mm512_sub_ps(x, shift16);
    return kNatural ? _mm512_mul_ps(difference, to_log2_16) : difference;
  };
  __m512 sum = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 p = exp2_nonpositive16(exponent(_mm512_loadu_ps(values + i)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(rounded + i), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(p)));
    sum = _mm512_add_ps(sum, p);
  }
  if (i < n) {
    const __mmask16 mask = tail_mask(n - i);
    const __m512 p = exp2_nonpositive16(exponent(_mm512_maskz_loadu_ps(mask, values + i)));
    _mm256_mask_storeu_epi16(rounded + i, mask, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(p)));
    sum = _mm512_mask_add_ps(sum, mask, sum, p);
  }
  return _mm512_reduce_add_ps(sum);
}

ATTNKERNELS_BF16_TARGET inline float exp2_shifted_sum_rounded(const float* values, int64_t n, float shift,
                                                              float to_log2, uint16_t* rounded) {
  return to_log2 == 1.0f ? exp2_shifted_sum16_rounded<false>(values, n, shift, to_log2, rounded)
                         : exp2_shifted_sum16_rounded<true>(values, n, shift, to_log2, rounded);
}
#endif
#elif defined(__AVX2__) && defined(__FMA__)
// 2^x on 8 lanes (see exp2_nonpositive). AVX2 has no scalef: n is added to p's exponent bits.
// At -127 (and below, -inf too) r = 0 and p = 1, so that sum is the bits of 0. Between -127 and
// -126 it is a denormal below 2^-126, not accurate (nothing a softmax can tell from 0). NaN: max
// and min return their second operand when one is NaN, and n converts to 0x80000000, shifted out
// to 0, so p (NaN) passes unchanged.
inline __m256 exp2_nonpositive8(__m256 x) {
  const __m256 clamped = _mm256_min_ps(_mm256_set1_ps(127.0f), _mm256_max_ps(_mm256_set1_ps(-127.0f), x));
  const __m256 n = _mm256_round_ps(clamped, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 r = _mm256_sub_ps(clamped, n);
  __m256 p = _mm256_set1_ps(kExp2Poly[6]);
  for (int i = 5; i >= 0; --i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExp2Poly[i]));
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23)));
}

// All ones in the first `remaining` (< 8) lanes.
inline __m256i tail_mask8(int64_t remaining) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(remaining)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

inline float horizontal_max8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

inline float horizontal_sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

template <>
inline float max_of<float>(const float* values, int64_t n) {
  const __m256 neg_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 result = neg_inf;
  __m256 nan_seen = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(values + i);
    nan_seen = _mm256_or_ps(nan_seen, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    result = _mm256_max_ps(result, x);
  }
  if (i < n) {
    const __m256i mask = tail_mask8(n - i);
    const __m256 x = _mm256_blendv_ps(neg_inf, _mm256_maskload_ps(values + i, mask), _mm256_castsi256_ps(mask));
    nan_seen = _mm256_or_ps(nan_seen, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    result = _mm256_max_ps(result, x);
  }
  return _mm256_movemask_ps(nan_seen) ? std::numeric_limits<float>::quiet_NaN() : horizontal_max8(result);
}

// The exp pass for scores in units of log2 (kNatural false) or natural ones.
template <bool kNatural>
inline float exp2_shifted_sum8(float* values, int64_t n, float shift, float to_log2) {
  const __m256 shift8 = _mm256_set1_ps(shift), to_log2_8 = _mm256_set1_ps(to_log2);
  const auto exponent = [&](__m256 x) {
    const __m256 difference = _mm256_sub_ps(x, shift8);
    return kNatural ? _mm256_mul_ps(difference, to_log2_8) : difference;
  };
  __m256 sum = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 p = exp2_nonpositive8(exponent(_mm256_loadu_ps(values + i)));
    _mm256_storeu_ps(values + i, p);
    sum = _mm256_add_ps(sum, p);
  }
  if (i < n) {
    const __m256i mask = tail_mask8(n - i);
    const __m256 p = exp2_nonpositive8(exponent(_mm256_maskload_ps(values + i, mask)));
    _mm256_maskstore_ps(values + i, mask, p);
    sum = _mm256_add_ps(sum, _mm256_and_ps(p, _mm256_castsi256_ps(mask)));
  }
  return horizontal_sum8(sum);
}

template <>
inline float exp2_shifted_sum<float>(float* values, int64_t n, float shift, float to_log2) {
  return to_log2 == 1.0f ? exp2_shifted_sum8<false>(values, n, shift, to_log2)
                         : exp2_shifted_sum8<true>(values, n, shift, to_log2);
}
#endif

// Dropout keep decisions from a counter-based hash (splitmix64's finaliser) of
// (seed, element index): the backward pass regenerates exactly the forward's
// mask without storing it, in any order and on any thread.
struct DropoutMask {
  uint64_t key = 0;
  uint64_t threshold = 0;  // drop when the 24-bit uniform is below this

  DropoutMask(int64_t seed, double p) {
    key = mix(static_cast<uint64_t>(seed) ^ 0x6A09E667F3BCC909ull);
    threshold = static_cast<uint64_t>(std::llround(p * 16777216.0));
  }

  static inline uint64_t mix(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }

  // element: the flat index in the (batch, query heads, L, S) attention matrix.
  inline bool keep(uint64_t element) const { return (mix(key + element * 0x9E3779B97F4A7C15ull) >> 40) >= threshold; }
};

}  // namespace ATTNKERNELS_CPU_ISA
}  // namespace cpu
}  // namespace attnkernels
