// Unit test of csrc/cpu/direct_tiles.h (the CPU attention's products for a few query rows, keys and
// values read in place) against plain double loops on the same values: every row count
// of a group, head dims with and without a partial last vector, key counts with a partial last step
// of 4, for float32, bfloat16 and float16 keys and values. Each key and value buffer ends exactly
// at its last element, the score rows and accumulators carry sentinels past their last column (a
// product that writes there fails), and the query rows' zero padding is the only padding there is.
// Built by tests/test_attention_few_queries.py with each variant's flags; prints "skip" and exits 0 on
// a CPU without the variant's instructions.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "cpu/direct_tiles.h"
#include "cpu_variant.h"

namespace tiles = attnkernels::cpu::ATTNKERNELS_CPU_ISA;
using tiles::kDirectRows;
using tiles::Lanes;

namespace {

std::mt19937 rng(4321);
int failures = 0;
constexpr float kSentinel = 12345.0f;

std::vector<float> random_floats(int64_t n) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> out(n);
  for (auto& x : out) x = normal(rng);
  return out;
}

void fail(const char* what, const char* type, int rows, int64_t a, int64_t b, int64_t i, int64_t j, double got,
          double want) {
  if (failures++ < 10) {
    std::printf("FAIL %s<%s> rows=%d (%lld, %lld) at (%lld, %lld): got %g want %g\n", what, type, rows, (long long)a,
                (long long)b, (long long)i, (long long)j, got, want);
  }
}

// scores[r][j] = alpha * q_r . k_j for `rows` query rows, E-long keys, `cols` keys.
template <int kRows, typename T>
void check_scores(const char* type, int64_t E, int64_t cols) {
  const int64_t q_ld = (E + Lanes::kWidth - 1) / Lanes::kWidth * Lanes::kWidth;
  std::vector<float> q(kRows * q_ld, 0.0f);
  const auto q_values = random_floats(kRows * E);
  for (int r = 0; r < kRows; ++r) std::copy(q_values.begin() + r * E, q_values.begin() + (r + 1) * E, q.begin() + r * q_ld);
  const auto k_float = random_floats(cols * E);
  std::vector<T> k(k_float.begin(), k_float.end());  // exactly cols * E elements: nothing to read past
  const int64_t ld = cols + 5;
  std::vector<float> out(kRows * ld, kSentinel);
  tiles::direct_scores<kRows>(q.data(), q_ld, k.data(), E, cols, 0.75f, out.data(), ld);
  for (int r = 0; r < kRows; ++r) {
    for (int64_t j = 0; j < ld; ++j) {
      const double got = out[r * ld + j];
      if (j >= cols) {
        if (got != kSentinel) fail("scores past the last key", type, kRows, E, cols, r, j, got, kSentinel);
        continue;
      }
      double want = 0, magnitude = 0;
      for (int64_t e = 0; e < E; ++e) {
        const double term = double(q[r * q_ld + e]) * double(static_cast<float>(k[j * E + e]));
        want += term;
        magnitude += std::abs(term);
      }
      want *= 0.75;
      if (!(std::abs(got - want) <= 1e-5 * (magnitude + 1.0))) fail("scores", type, kRows, E, cols, r, j, got, want);
    }
  }
}

// accum[r][e] += sum_j p[r][j] * v[j][e] for `rows` rows, `cols` keys, Ev-long value rows.
template <int kRows, typename T>
void check_values(const char* type, int64_t Ev, int64_t cols) {
  const int64_t ld = cols + 3;
  const auto p = random_floats(kRows * ld);
  const auto v_float = random_floats(cols * Ev);
  std::vector<T> v(v_float.begin(), v_float.end());
  // The accumulators of the rows, then a sentinel row past the last one.
  std::vector<float> accum = random_floats(kRows * Ev);
  const auto base = accum;
  accum.resize((kRows + 1) * Ev, kSentinel);
  tiles::direct_values<kRows>(p.data(), ld, v.data(), Ev, cols, accum.data(), -1.5f);
  for (int r = 0; r <= kRows; ++r) {
    for (int64_t e = 0; e < Ev; ++e) {
      const double got = accum[r * Ev + e];
      if (r == kRows) {
        if (got != kSentinel) fail("values past the last row", type, kRows, Ev, cols, r, e, got, kSentinel);
        continue;
      }
      double want = base[r * Ev + e], magnitude = std::abs(want);
      for (int64_t j = 0; j < cols; ++j) {
        const double term = -1.5 * double(p[r * ld + j]) * double(static_cast<float>(v[j * Ev + e]));
        want += term;
        magnitude += std::abs(term);
      }
      if (!(std::abs(got - want) <= 1e-5 * (magnitude + 1.0))) fail("values", type, kRows, Ev, cols, r, e, got, want);
    }
  }
}

// out[j][e] += alpha * sum_r w[r][j] * x[r][e] (dK, dV of the backward): x rows and out rows padded to whole
// vectors, the padding of out left as it is when x's is 0.
template <int kRows>
void check_outer(int64_t n, int64_t cols) {
  const int64_t padded = tiles::direct_padded(n), ld = cols + 2;
  const auto w = random_floats(kRows * ld);
  std::vector<float> x(kRows * padded, 0.0f);
  for (int r = 0; r < kRows; ++r) {
    const auto row = random_floats(n);
    std::copy(row.begin(), row.end(), x.begin() + r * padded);
  }
  std::vector<float> out = random_floats(cols * padded);
  for (int64_t j = 0; j < cols; ++j) std::fill(out.begin() + j * padded + n, out.begin() + (j + 1) * padded, kSentinel);
  const auto base = out;
  tiles::direct_outer<kRows>(w.data(), ld, x.data(), padded, padded, cols, 0.5f, out.data(), padded);
  for (int64_t j = 0; j < cols; ++j) {
    for (int64_t e = 0; e < padded; ++e) {
      double want = base[j * padded + e], magnitude = std::abs(want);
      for (int r = 0; r < kRows; ++r) {
        const double term = 0.5 * double(w[r * ld + j]) * double(x[r * padded + e]);
        want += term;
        magnitude += std::abs(term);
      }
      const double got = out[j * padded + e];
      if (!(std::abs(got - want) <= 1e-5 * (magnitude + 1.0))) fail("outer", "float", kRows, n, cols, j, e, got, want);
    }
  }
}

template <int kRows, typename T>
void check_shapes(const char* type) {
  std::uniform_int_distribution<int64_t> dims(1, 300), keys(1, 41);
  for (int trial = 0; trial < 25; ++trial) {
    check_scores<kRows, T>(type, dims(rng), keys(rng));
    check_values<kRows, T>(type, dims(rng), keys(rng));
  }
  // Whole vectors and whole steps of 4 keys, and one element and one key more.
  for (const int64_t dim : {int64_t(64), int64_t(65), int64_t(128), int64_t(256)}) {
    for (const int64_t cols : {int64_t(4), int64_t(5), int64_t(512)}) {
      check_scores<kRows, T>(type, dim, cols);
      check_values<kRows, T>(type, dim, cols);
    }
  }
}

template <int kRows>
void check_outer_shapes() {
  std::uniform_int_distribution<int64_t> dims(1, 300), keys(1, 41);
  for (int trial = 0; trial < 25; ++trial) check_outer<kRows>(dims(rng), keys(rng));
  check_outer<kRows>(64, 256);
  check_outer<kRows>(65, 3);
}

template <typename T>
void check_type(const char* type) {
  check_shapes<1, T>(type);
  check_shapes<2, T>(type);
  if constexpr (kDirectRows == 4) {
    check_shapes<3, T>(type);
    check_shapes<4, T>(type);
  }
}

}  // namespace

int main() {
  if (!cpu_runs_this_variant()) return 0;
  check_type<float>("float");
  check_type<c10::BFloat16>("bfloat16");
  check_type<c10::Half>("float16");
  check_outer_shapes<1>();
  check_outer_shapes<2>();
  if constexpr (kDirectRows == 4) {
    check_outer_shapes<3>();
    check_outer_shapes<4>();
  }
  std::printf(failures == 0 ? "ok\n" : "%d failures\n", failures);
  return failures == 0 ? 0 : 1;
}
