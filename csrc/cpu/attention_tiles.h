// The tile building blocks of the CPU attention kernels (attention_kernel.cpp): read access to
// the mask, which hidden tiles may be skipped, causal masking, dropout, conversion of rows to the
// accumulation dtype, and the task loop. Compiled once per CPU variant, like the kernels.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <optional>
#include <type_traits>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "../attention_checks.h"
#include "../cpu_isa.h"
#include "attention_math.h"
#include "scratch_memory.h"

namespace attnkernels {
namespace cpu {
inline namespace ATTNKERNELS_CPU_ISA {  // see cpu_isa.h

// Read access to the (B, Hq, L, S) mask through its strides.
template <typename acc_t>
struct MaskView {
  const bool* bools = nullptr;
  const acc_t* values = nullptr;
  int64_t heads = 1, stride_b = 0, stride_h = 0, stride_l = 0, stride_s = 0;

  // mask: checked by check_attention_mask.
  MaskView(const std::optional<at::Tensor>& mask, const AttentionShape& shape) {
    if (!mask.has_value()) return;
    const at::Tensor& m = *mask;
    if (m.scalar_type() == at::kBool) {
      bools = m.const_data_ptr<bool>();
    } else {
      values = m.const_data_ptr<acc_t>();
    }
    heads = shape.q_heads;
    stride_b = m.stride(0);
    stride_h = m.stride(1);
    stride_l = m.stride(2);
    stride_s = m.stride(3);
  }

  bool present() const { return bools != nullptr || values != nullptr; }
  bool is_float() const { return values != nullptr; }

  int64_t offset(int64_t bh, int64_t row, int64_t col) const {
    return (bh / heads) * stride_b + (bh % heads) * stride_h + row * stride_l + col * stride_s;
  }

  // Whether any entry of the tile lets attention through (else the tile is skipped).
  bool any_allowed(int64_t bh, int64_t row0, int64_t rows, int64_t col0, int64_t cols) const {
    const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t base = offset(bh, row0 + r, col0);
      for (int64_t c = 0; c < cols; ++c) {
        if (bools != nullptr ? bools[base + c * stride_s] : !(values[base + c * stride_s] == neg_inf)) return true;
      }
    }
    return false;
  }

  void apply(int64_t bh, int64_t row0, int64_t rows, int64_t col0, int64_t cols, acc_t* scores, int64_t ld) const {
    const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t base = offset(bh, row0 + r, col0);
      acc_t* row = scores + r * ld;
      if (bools != nullptr) {
        const bool* m = bools + base;
        // Hidden scores get -inf added, as torch adds a bool mask: a NaN or +inf score stays NaN.
        for (int64_t c = 0; c < cols; ++c) row[c] = m[c * stride_s] ? row[c] : row[c] + neg_inf;
      } else {
        const acc_t* m = values + base;
        if (stride_s == 1) {
#pragma omp simd
          for (int64_t c = 0; c < cols; ++c) row[c] += m[c];
        } else {
          for (int64_t c = 0; c < cols; ++c) row[c] += m[c * stride_s];
        }
      }
    }
  }
};

// The largest |value| of n values, +inf when one is NaN or infinite.
template <typename T>
double largest_magnitude(const T* values, int64_t n) {
  double most = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double x = std::abs(static_cast<double>(values[i]));
    most = x <= most ? most : (x > most ? x : std::numeric_limits<double>::infinity());  // NaN -> inf
  }
  return most;
}

template <typename T>
bool any_nan(const T* values, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if (std::isnan(static_cast<double>(values[i]))) return true;
  }
  return false;
}

// Whether a tile that the mask hides entirely can still change the result, so that it must be
// computed, not skipped. torch adds the mask to the scores, so a NaN or +inf score behind it makes
// its row NaN, and a non-finite value row behind it still gives 0 * inf = NaN. Finite q and k rows
// whose scaled dot products cannot overflow, and finite v rows, make the tile a no-op.
template <typename scalar_t>
bool hidden_tile_matters(const scalar_t* q_rows, int64_t rows, const scalar_t* k_rows, const scalar_t* v_rows,
                         int64_t cols, int64_t E, int64_t Ev, double scale) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr double kInf = std::numeric_limits<double>::infinity();
  if (!(largest_magnitude(v_rows, cols * Ev) < kInf)) return true;
  // |q . k| * scale <= E * max|q| * max|k| * scale; half the largest acc_t leaves room for rounding.
  const double bound =
      static_cast<double>(E) * std::abs(scale) * largest_magnitude(q_rows, rows * E) * largest_magnitude(k_rows, cols * E);
  return !(bound < 0.5 * static_cast<double>(std::numeric_limits<acc_t>::max()));
}

// Whether the tile of head bh (kv: its key/value head) at (row0, col0) can be skipped: the mask
// hides all of it, and nothing in it can turn a hidden score into NaN.
template <typename scalar_t, typename acc_t>
bool hidden_and_inert(const MaskView<acc_t>& mask, const AttentionShape& shape, int64_t bh, int64_t kv, int64_t row0,
                      int64_t rows, int64_t col0, int64_t cols, const scalar_t* q, const scalar_t* k,
                      const scalar_t* v, double scale) {
  if (!mask.present() || mask.any_allowed(bh, row0, rows, col0, cols)) return false;
  return !hidden_tile_matters(q + (bh * shape.L + row0) * shape.E, rows, k + (kv * shape.S + col0) * shape.E,
                              v + (kv * shape.S + col0) * shape.Ev, cols, shape.E, shape.Ev, scale);
}

// Whether the gradient rows [first, first + rows) have a finite delta and dO and a non-NaN lse (-inf is a
// fully masked row): a hidden tile then adds exactly 0 to their gradients.
template <typename scalar_t, typename acc_t>
bool gradient_rows_finite(const acc_t* lse, const acc_t* delta, const scalar_t* grad_out, int64_t first, int64_t rows,
                          int64_t Ev) {
  constexpr double kInf = std::numeric_limits<double>::infinity();
  return !any_nan(lse + first, rows) && largest_magnitude(delta + first, rows) < kInf &&
         largest_magnitude(grad_out + first * Ev, rows * Ev) < kInf;
}

// The causal diagonal of a tile, for the tile products: entry (r, c) of the tile is hidden when
// c > r + offset (offset = row0 - col0). Absent for tiles without hidden entries.
struct Diagonal {
  bool present = false;
  int64_t offset = 0;
};

// Top-left causal: query row i attends to keys j <= i.
inline Diagonal causal_diagonal(bool is_causal, int64_t row0, int64_t col0, int64_t cols) {
  return is_causal && col0 + cols - 1 > row0 ? Diagonal{true, row0 - col0} : Diagonal{};
}

// How many leading columns of the tile's row r the diagonal leaves visible.
inline int64_t visible_columns(Diagonal diagonal, int64_t r, int64_t cols) {
  return diagonal.present ? std::clamp<int64_t>(r + diagonal.offset + 1, 0, cols) : cols;
}

// Sets to 0 the entries [visible, cols) of a tile row behind the causal diagonal, at most `count` of
// them (the tile products read no further: see each Tiles' kReadsPastDiagonal).
template <typename acc_t>
inline void zero_behind_diagonal(acc_t* row, int64_t visible, int64_t cols, int64_t count) {
  std::fill(row + visible, row + visible + std::min(cols - visible, count), acc_t(0));
}

// dst[i] = src[i] as acc_t for i < n. float16 and bfloat16 to float32 eight at a time where the
// variant has AVX2 (F16C's vcvtph2ps; bfloat16 is the high half of a float32): c10's scalar
// float16 conversion would cost as much as a tenth of a widened attention forward.
template <typename scalar_t, typename acc_t>
void widen(const scalar_t* src, int64_t n, acc_t* dst) {
  int64_t i = 0;
#if defined(__AVX2__) && defined(__F16C__)
  if constexpr (std::is_same_v<acc_t, float> && std::is_same_v<scalar_t, c10::Half>) {
    for (; i + 8 <= n; i += 8) {
      _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
    }
  } else if constexpr (std::is_same_v<acc_t, float> && std::is_same_v<scalar_t, c10::BFloat16>) {
    for (; i + 8 <= n; i += 8) {
      const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
      _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16)));
    }
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<acc_t>(src[i]);
}

// dst[i] = src[i] * scale in scalar_t for i < n. float32 to float16 eight at a time where the variant
// has AVX2 (F16C's vcvtps2ph, round to nearest even: the instruction c10's scalar conversion compiles
// to there, so the same bits), which took ~9 % of a float16 attention forward one element at a time.
template <typename scalar_t, typename acc_t>
void narrow_scaled(const acc_t* src, acc_t scale, int64_t n, scalar_t* dst) {
  int64_t i = 0;
#if defined(__AVX2__) && defined(__F16C__)
  if constexpr (std::is_same_v<acc_t, float> && std::is_same_v<scalar_t, c10::Half>) {
    const __m256 scale8 = _mm256_set1_ps(scale);
    for (; i + 8 <= n; i += 8) {
      const __m128i half8 = _mm256_cvtps_ph(_mm256_mul_ps(_mm256_loadu_ps(src + i), scale8),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), half8);
    }
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i] * scale);
}

// sum_i a[i] * b[i] in acc_t, vectorised: the additions run in a few interleaved sums (a sum
// taken in order would be one dependent add after another, about 4 cycles per element).
template <typename scalar_t, typename acc_t>
acc_t dot_in(const scalar_t* a, const scalar_t* b, int64_t n) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += static_cast<acc_t>(a[i]) * static_cast<acc_t>(b[i]);
  return sum;
}

// Rows [row0, row0 + rows) of a row-major (.., width) matrix as acc_t: the
// tensor's own memory when no conversion is needed, else converted into `buffer`.
template <typename scalar_t, typename acc_t>
const acc_t* rows_as_acc(const scalar_t* base, int64_t row0, int64_t rows, int64_t width, acc_t* buffer) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return base + row0 * width;
  } else {
    widen(base + row0 * width, rows * width, buffer);
    return buffer;
  }
}

// Dropout of a (rows x cols) tile of probabilities: keep with probability 1 - p,
// scaled by 1 / (1 - p). `first` is the flat (B, Hq, L, S) index of the tile's corner.
template <typename acc_t>
void apply_dropout(const DropoutMask& dropout, acc_t keep_scale, uint64_t first, int64_t S, int64_t rows,
                   int64_t cols, acc_t* tile, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    const uint64_t row_first = first + static_cast<uint64_t>(r * S);
    acc_t* row = tile + r * ld;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) row[c] = dropout.keep(row_first + c) ? row[c] * keep_scale : acc_t(0);
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Runs run(task) for task in [0, tasks) on torch's intra-op threads, handing
// tasks out one at a time: causal tiles differ in cost, and on a shared machine
// a core may be slowed by other work, so a static split would leave one idle.
// make_state() builds each thread's scratch buffers once.
template <typename MakeState, typename Run>
void parallel_tasks(int64_t tasks, MakeState make_state, Run run) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tasks));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    auto state = make_state();
    for (int64_t task = next.fetch_add(1); task < tasks; task = next.fetch_add(1)) run(task, state);
  });
}

}  // namespace ATTNKERNELS_CPU_ISA
}  // namespace cpu
}  // namespace attnkernels
