// Unit test of csrc/cpu/dot_tiles.h (the register-tile products of the CPU attention kernels)
// against plain double loops on the same values, over random shapes that cover every row and
// column tail and odd reduction lengths: the float32 FMA tiles, and the bfloat16 dot-product
// tiles where the CPU has AVX512-BF16. Built by tests/test_dot_tiles.py with the avx512 variant's
// flags and with the avx2 variant's (float32 tiles only); prints "skip" and exits 0 on a CPU
// without the variant's instructions.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "cpu/dot_tiles.h"
#include "cpu_variant.h"

namespace tiles = attnkernels::cpu::ATTNKERNELS_CPU_ISA;
using tiles::CausalSkip;
using tiles::fma_product;
using tiles::Skip;
using tiles::pack_floats_from_columns;
using tiles::pack_floats_from_rows;
using tiles::packed_width;
using tiles::pair_count;
#if defined(ATTNKERNELS_CPU_AVX512)
using tiles::dot_product;
using tiles::pack_pairs_from_columns;
using tiles::pack_pairs_from_rows;
using tiles::PairLayout;
using tiles::round_rows;
#endif
using BF16 = c10::BFloat16;

namespace {

std::mt19937 rng(1234);
int failures = 0;

std::vector<float> random_floats(int64_t n) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> out(n);
  for (auto& x : out) x = normal(rng);
  return out;
}

// Scratch buffers start as NaN, as reused ones may hold anything: a pad a packer fails to zero shows.
constexpr uint32_t kNaNPair = 0x7FC07FC0u;
[[maybe_unused]] std::vector<uint32_t> packed_buffer(int64_t k, int64_t n) {
  return std::vector<uint32_t>(pair_count(k) * packed_width(n), kNaNPair);
}

[[maybe_unused]] std::vector<BF16> to_bf16(const std::vector<float>& x) {
  std::vector<BF16> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) out[i] = BF16(x[i]);
  return out;
}

// got (m x n, row stride ldc) against want = alpha * sum_p a(i, p) b(p, j) (+ base) in double.
template <typename A, typename B>
void check(const char* what, int64_t m, int64_t n, int64_t k, A a, B b, float alpha, const std::vector<float>& base,
           const std::vector<float>& got, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double want = 0, magnitude = 0;
      for (int64_t p = 0; p < k; ++p) {
        want += static_cast<double>(a(i, p)) * static_cast<double>(b(p, j));
        magnitude += std::abs(static_cast<double>(a(i, p)) * static_cast<double>(b(p, j)));
      }
      want = want * alpha + (base.empty() ? 0.0 : base[i * ldc + j]);
      const double error = std::abs(got[i * ldc + j] - want);
      if (!(error <= 1e-5 * (std::abs(alpha) * magnitude + 1.0))) {
        if (failures++ < 10) {
          std::printf("FAIL %s m=%lld n=%lld k=%lld at (%lld, %lld): got %g want %g\n", what, (long long)m,
                      (long long)n, (long long)k, (long long)i, (long long)j, got[i * ldc + j], want);
        }
        return;
      }
    }
  }
}

#if defined(ATTNKERNELS_CPU_AVX512)
// C = A X^T with X (n x k) packed by rows, A (m x k) bfloat16 rows used in place (k even: QK^T,
// dO V^T), or float32 rows rounded to bfloat16 (any k).
void rows_times_rows(int64_t m, int64_t n, int64_t k, bool in_place) {
  const auto a_float = random_floats(m * k);
  const auto a = to_bf16(a_float), x = to_bf16(random_floats(n * k));
  std::vector<BF16> a_rounded(m * 2 * pair_count(k), BF16(NAN));
  round_rows(a_float.data(), m, k, k, a_rounded.data());
  auto packed = packed_buffer(k, n);
  pack_pairs_from_rows(x.data(), n, k, k, packed.data());
  const int64_t ldc = n + 3;
  std::vector<float> c(m * ldc, 7.0f);
  if (in_place) {
    dot_product(m, n, k / 2, a.data(), k, 2, packed.data(), 0.5f, false, c.data(), ldc);
  } else {
    dot_product(m, n, pair_count(k), a_rounded.data(), 2 * pair_count(k), 2, packed.data(), 0.5f,
                false, c.data(), ldc);
  }
  check("rows x rows", m, n, k, [&](int64_t i, int64_t p) { return float(a[i * k + p]); },
        [&](int64_t p, int64_t j) { return float(x[j * k + p]); }, 0.5f, {}, c, ldc);
}

// C += A X with A float32 rows rounded to bfloat16 (any k) and X (k x n) packed by columns: PV, dS K.
template <typename T>
void rounded_rows_times_columns(int64_t m, int64_t n, int64_t k) {
  const auto a = random_floats(m * k);
  const auto x_float = random_floats(k * n);
  std::vector<T> x(x_float.begin(), x_float.end());
  std::vector<BF16> a_rounded(m * 2 * pair_count(k), BF16(NAN));
  round_rows(a.data(), m, k, k, a_rounded.data());
  auto packed = packed_buffer(k, n);
  pack_pairs_from_columns(x.data(), k, n, n, packed.data());
  const int64_t ldc = n;
  auto base = random_floats(m * ldc);
  auto c = base;
  dot_product(m, n, pair_count(k), a_rounded.data(), 2 * pair_count(k), 2, packed.data(), 1.5f, true,
              c.data(), ldc);
  check("rounded rows x columns", m, n, k, [&](int64_t i, int64_t p) { return float(BF16(a[i * k + p])); },
        [&](int64_t p, int64_t j) { return float(BF16(float(x[p * n + j]))); }, 1.5f, base, c, ldc);
}

// C += Y^T X with Y (k x m) and X (k x n) both packed by columns, Y read as the left operand
// through strides: dV += P^T dO, dK += dS^T Q.
void columns_times_columns(int64_t m, int64_t n, int64_t k) {
  const auto y = to_bf16(random_floats(k * m));
  const auto x = random_floats(k * n);
  auto y_packed = packed_buffer(k, m), x_packed = packed_buffer(k, n);
  pack_pairs_from_columns(y.data(), k, m, m, y_packed.data(), PairLayout::kRows);
  pack_pairs_from_columns(x.data(), k, n, n, x_packed.data());
  const int64_t ldc = n + 1;
  auto base = random_floats(m * ldc);
  auto c = base;
  dot_product(m, n, pair_count(k), reinterpret_cast<const BF16*>(y_packed.data()), 2, 2 * packed_width(m),
              x_packed.data(), -1.0f, true, c.data(), ldc);
  check("columns x columns", m, n, k, [&](int64_t i, int64_t p) { return float(y[p * m + i]); },
        [&](int64_t p, int64_t j) { return float(BF16(x[p * n + j])); }, -1.0f, base, c, ldc);
}

#endif

// float32: C = A X^T (X packed by rows, A in place) and C += Y^T X (X packed by columns, Y read
// transposed in place), as the float32 attention tiles use them.
void float_products(int64_t m, int64_t n, int64_t k) {
  const auto a = random_floats(m * k), x_rows = random_floats(n * k);
  std::vector<float> packed(k * packed_width(n), NAN);
  pack_floats_from_rows(x_rows.data(), n, k, k, packed.data());
  const int64_t ldc = n + 2;
  std::vector<float> c(m * ldc, 7.0f);
  fma_product(m, n, k, a.data(), k, 1, packed.data(), 0.25f, false, c.data(), ldc);
  check("float rows x rows", m, n, k, [&](int64_t i, int64_t p) { return a[i * k + p]; },
        [&](int64_t p, int64_t j) { return x_rows[j * k + p]; }, 0.25f, {}, c, ldc);

  const auto y = random_floats(k * m), x = random_floats(k * n);
  std::fill(packed.begin(), packed.end(), NAN);
  pack_floats_from_columns(x.data(), k, n, n, packed.data());
  auto base = random_floats(m * ldc);
  auto d = base;
  fma_product(m, n, k, y.data(), 1, m, packed.data(), -2.0f, true, d.data(), ldc);
  check("float columns x columns", m, n, k, [&](int64_t i, int64_t p) { return y[p * m + i]; },
        [&](int64_t p, int64_t j) { return x[p * n + j]; }, -2.0f, base, d, ldc);
}

// The causal skips: with the hidden terms zero (as the attention's P and dS are), a product that
// skips them equals the full one; with kColumnsAfter, on the entries left of the diagonal.
template <typename T>
void causal_skips(int64_t m, int64_t n, int64_t k, int64_t offset) {
  constexpr bool dot = std::is_same_v<T, BF16>;
  const int64_t k_even = dot ? 2 * ((k + 1) / 2) : k;
  auto round = [](float x) { return dot ? float(BF16(x)) : x; };
  (void)round;
  // kColumnsAfter: C (m queries x n keys) = A (m x k) X^T, X (n x k): left of the diagonal, the
  // same bits as the full product.
  {
    const auto a = random_floats(m * k_even), x = random_floats(n * k_even);
    const auto a_t = std::vector<T>(a.begin(), a.end()), x_t = std::vector<T>(x.begin(), x.end());
    std::vector<uint32_t> packed((k_even / (dot ? 2 : 1)) * packed_width(n));
    std::vector<float> full(m * n), skipped(m * n, NAN);
    for (Skip skip : {Skip{}, Skip{CausalSkip::kColumnsAfter, offset}}) {
      float* c = skip.kind == CausalSkip::kNone ? full.data() : skipped.data();
#if defined(ATTNKERNELS_CPU_AVX512)
    if constexpr (dot) {
        pack_pairs_from_rows(x_t.data(), n, k_even, k_even, packed.data());
        dot_product(m, n, k_even / 2, a_t.data(), k_even, 2, packed.data(), 1.0f, false, c, n, skip);
      } else
#endif
      {
        pack_floats_from_rows(x.data(), n, k, k, reinterpret_cast<float*>(packed.data()));
        fma_product(m, n, k, a.data(), k, 1, reinterpret_cast<const float*>(packed.data()), 1.0f, false, c, n, skip);
      }
    }
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = 0; j < n && j <= i + offset; ++j) {
        if (!(skipped[i * n + j] == full[i * n + j]) && failures++ < 10) {
          std::printf("FAIL causal columns m=%lld n=%lld k=%lld offset=%lld at (%lld, %lld)\n", (long long)m,
                      (long long)n, (long long)k, (long long)offset, (long long)i, (long long)j);
        }
      }
    }
  }
  // kReductionAfter: C (m queries x n) += A (m x k keys) X (k x n), A hidden where p > i + offset.
  {
    auto a = random_floats(m * k);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t p = 0; p < k; ++p)
        if (p > i + offset) a[i * k + p] = 0.0f;
    const auto x = random_floats(k * n);
    auto base = random_floats(m * n), c = base;
    const Skip skip{CausalSkip::kReductionAfter, offset};
#if defined(ATTNKERNELS_CPU_AVX512)
    if constexpr (dot) {
      std::vector<BF16> a_rounded(m * 2 * pair_count(k), BF16(NAN));
      round_rows(a.data(), m, k, k, a_rounded.data());
      auto packed = packed_buffer(k, n);
      pack_pairs_from_columns(x.data(), k, n, n, packed.data());
      dot_product(m, n, pair_count(k), a_rounded.data(), 2 * pair_count(k), 2, packed.data(), 1.0f, true, c.data(), n,
                  skip);
    } else
#endif
    {
      std::vector<float> packed(k * packed_width(n), NAN);
      pack_floats_from_columns(x.data(), k, n, n, packed.data());
      fma_product(m, n, k, a.data(), k, 1, packed.data(), 1.0f, true, c.data(), n, skip);
    }
    check("causal reduction after", m, n, k, [&](int64_t i, int64_t p) { return round(a[i * k + p]); },
          [&](int64_t p, int64_t j) { return round(x[p * n + j]); }, 1.0f, base, c, n);
  }
  // kReductionBefore: C (m keys x n) += Y^T (m x k queries) X (k x n), Y hidden where i > p + offset.
  {
    auto y = random_floats(k * m);
    for (int64_t p = 0; p < k; ++p)
      for (int64_t i = 0; i < m; ++i)
        if (i > p + offset) y[p * m + i] = 0.0f;
    const auto x = random_floats(k * n);
    auto base = random_floats(m * n), c = base;
    const Skip skip{CausalSkip::kReductionBefore, offset};
#if defined(ATTNKERNELS_CPU_AVX512)
    if constexpr (dot) {
      auto y_packed = packed_buffer(k, m), x_packed = packed_buffer(k, n);
      pack_pairs_from_columns(y.data(), k, m, m, y_packed.data(), PairLayout::kRows);
      pack_pairs_from_columns(x.data(), k, n, n, x_packed.data());
      dot_product(m, n, pair_count(k), reinterpret_cast<const BF16*>(y_packed.data()), 2, 2 * packed_width(m),
                  x_packed.data(), 1.0f, true, c.data(), n, skip);
    } else
#endif
    {
      std::vector<float> packed(k * packed_width(n), NAN);
      pack_floats_from_columns(x.data(), k, n, n, packed.data());
      fma_product(m, n, k, y.data(), 1, m, packed.data(), 1.0f, true, c.data(), n, skip);
    }
    check("causal reduction before", m, n, k, [&](int64_t i, int64_t p) { return round(y[p * m + i]); },
          [&](int64_t p, int64_t j) { return round(x[p * n + j]); }, 1.0f, base, c, n);
  }
}

#if defined(ATTNKERNELS_CPU_AVX512)
// A NaN or infinity in one row of A reaches that row of C only.
void non_finite_stays_in_its_row() {
  const int64_t m = 9, n = 40, k = 6;
  auto a = to_bf16(random_floats(m * k));
  const auto x = to_bf16(random_floats(n * k));
  a[3 * k + 1] = BF16(NAN);
  a[5 * k + 4] = BF16(INFINITY);
  auto packed = packed_buffer(k, n);
  pack_pairs_from_rows(x.data(), n, k, k, packed.data());
  std::vector<float> c(m * n);
  dot_product(m, n, k / 2, a.data(), k, 2, packed.data(), 1.0f, false, c.data(), n);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      const bool finite = std::isfinite(c[i * n + j]);
      if (finite != (i != 3 && i != 5) || (i == 3 && !std::isnan(c[i * n + j]))) {
        if (failures++ < 10) std::printf("FAIL non-finite row %lld col %lld: %g\n", (long long)i, (long long)j, c[i * n + j]);
        return;
      }
    }
  }
}

#endif

}  // namespace

int main() {
  if (!cpu_runs_this_variant()) return 0;
  std::uniform_int_distribution<int64_t> rows(1, 37), cols(1, 100), depth(1, 70);
  std::uniform_int_distribution<int64_t> offsets(-40, 60);
  for (int trial = 0; trial < 60; ++trial) float_products(rows(rng), cols(rng), depth(rng));
  for (int trial = 0; trial < 60; ++trial) causal_skips<float>(rows(rng), cols(rng), depth(rng), offsets(rng));
  float_products(256, 512, 64);
  float_products(64, 256, 128);
#if defined(ATTNKERNELS_CPU_AVX512)
  if (!__builtin_cpu_supports("avx512bf16")) {
    std::printf(failures == 0 ? "ok (float32 only: this CPU has no AVX512-BF16)\n" : "%d failures\n", failures);
    return failures == 0 ? 0 : 1;
  }
  for (int trial = 0; trial < 60; ++trial) {
    const int64_t m = rows(rng), n = cols(rng), k = depth(rng);
    rows_times_rows(m, n, 2 * ((k + 1) / 2), true);
    rows_times_rows(m, n, k, false);
    rounded_rows_times_columns<BF16>(m, n, k);
    rounded_rows_times_columns<float>(m, n, k);
    columns_times_columns(m, n, k);
  }
  for (int trial = 0; trial < 60; ++trial) causal_skips<BF16>(rows(rng), cols(rng), depth(rng), offsets(rng));
  for (int64_t k : {1, 2, 31, 32, 33, 64, 512}) {  // the attention tiles' shapes and their edges
    rounded_rows_times_columns<BF16>(8, 64, k);
    columns_times_columns(64, 256, k);
  }
  rows_times_rows(256, 512, 64, true);
  non_finite_stays_in_its_row();
  std::printf(failures == 0 ? "ok\n" : "%d failures\n", failures);
#else
  std::printf(failures == 0 ? "ok (float32 tiles of the avx2 variant)\n" : "%d failures\n", failures);
#endif
  return failures == 0 ? 0 : 1;
}
