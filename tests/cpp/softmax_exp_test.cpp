// Unit test of the softmax passes of csrc/cpu/attention_math.h as each CPU variant compiles them:
// exp_shifted_sum (values[i] = exp(values[i] - shift), returning their sum) and max_of against
// double precision, on every tail length of the vector loops. exp may be off by a few units in
// the last place (a polynomial), never more: relative error <= 2e-7 (under 2 ulp) where the result is a normal
// float; exactly 0 for -inf and far below the shift; NaN stays NaN; and shift slightly below a
// value (the backward's lse after rounding) still gives exp of a small positive number.
// Built by tests/test_softmax_math.py; prints "skip" on a CPU without the variant's instructions.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "cpu/attention_math.h"

namespace math = attnkernels::cpu::ATTNKERNELS_CPU_ISA;

static int failures = 0;

static void fail(const char* what, double got, double want, double x) {
  if (++failures <= 10) std::printf("%s: exp(%.9g) gave %.9g, expected %.9g\n", what, x, got, want);
}

// exp_shifted_sum over values, checked element by element and in the sum.
static void check_exp(std::vector<float> values, float shift) {
  const std::vector<float> inputs = values;
  const float sum = math::exp_shifted_sum(values.data(), static_cast<int64_t>(values.size()), shift);
  double want_sum = 0;
  bool nan_seen = false;
  for (size_t i = 0; i < values.size(); ++i) {
    // The kernels subtract in float32 (as torch does): the test checks the exp of that difference.
    const double x = static_cast<double>(inputs[i] - shift);
    const double want = std::exp(x);
    const double got = values[i];
    if (std::isnan(inputs[i])) {
      nan_seen = true;
      if (!std::isnan(got)) fail("NaN input", got, want, x);
      continue;
    }
    want_sum += want;
    if (x < -88.0) {
      if (got != 0.0) fail("far below the shift", got, 0.0, x);
    } else if (want >= 1e-37) {  // a normal float32 result (the kernels may flush below)
      if (!(std::abs(got - want) <= 2e-7 * want)) fail("relative error", got, want, x);
    } else if (!(got >= 0.0 && got <= 2e-37)) {
      fail("underflow", got, want, x);
    }
  }
  if (nan_seen ? !std::isnan(sum) : !(std::abs(sum - want_sum) <= 1e-6 * want_sum + 1e-30)) {
    fail("sum", sum, want_sum, shift);
  }
}

int main() {
  __builtin_cpu_init();
#if defined(ATTNKERNELS_CPU_AVX512)
  if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512dq")) {
    std::printf("skip: this CPU has no AVX-512\n");
    return 0;
  }
#elif defined(ATTNKERNELS_CPU_AVX2)
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) {
    std::printf("skip: this CPU has no AVX2 + FMA\n");
    return 0;
  }
#endif
  // A sweep of x = value - shift over [-100, 0] (every exponent the result can have), for shifts
  // whose own rounding differs.
  for (float shift : {0.0f, 3.25f, -17.5f, 88.0f, 1000.0f}) {
    std::vector<float> values;
    for (double x = -100.0; x <= 0.0; x += 1.0 / 1024 + 1e-5) values.push_back(static_cast<float>(shift + x));
    values.push_back(shift);
    check_exp(values, shift);
  }
  // Slightly positive (rounding in the backward's lse) and every tail length of the 8- and 16-wide loops.
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> near(-30.0f, 0.01f);
  for (int n = 0; n <= 40; ++n) {
    std::vector<float> values(n);
    for (float& v : values) v = near(rng);
    check_exp(values, 0.0f);
  }
  // Far above the shift (not a softmax input, but an inconsistent lse could give one): clamped, never garbage.
  {
    std::vector<float> values = {100.0f, 88.0f, 1e30f, 89.0f, 0.0f, 95.0f, 200.0f, 88.5f, 91.0f};
    const std::vector<float> inputs = values;
    math::exp_shifted_sum(values.data(), static_cast<int64_t>(values.size()), 0.0f);
    for (size_t i = 0; i < values.size(); ++i) {
      const double limit = std::exp(static_cast<double>(std::min(inputs[i], 88.0f)));
      if (!(std::abs(values[i] - limit) <= 2e-7 * limit)) fail("above 88", values[i], limit, inputs[i]);
    }
  }
  // Non-finite values: -inf gives exactly 0, NaN stays NaN (in the sum too).
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  check_exp({-inf, 0.0f, -1.0f, -inf, -90.0f, -87.0f, -86.0f, -1e30f, -0.0f, -inf, -2.0f}, 0.0f);
  check_exp({-inf, 0.0f, nan, -1.0f, -3.0f, -inf, -0.5f, -7.0f, -9.0f, nan, -2.0f}, 0.0f);
  // max_of: the maximum, -inf when every value is -inf, NaN when one is NaN.
  for (int n = 1; n <= 40; ++n) {
    std::vector<float> values(n, -inf);
    if (math::max_of(values.data(), n) != -inf) fail("max of -inf", math::max_of(values.data(), n), -inf, n);
    values[n / 2] = 5.0f;
    values[n - 1] = std::max(values[n - 1], 4.0f);
    if (math::max_of(values.data(), n) != 5.0f) fail("max", math::max_of(values.data(), n), 5.0, n);
    values[(n * 3) / 4] = nan;
    if (!std::isnan(math::max_of(values.data(), n))) fail("max with NaN", math::max_of(values.data(), n), nan, n);
  }
  std::printf(failures == 0 ? "ok\n" : "%d failures\n", failures);
  return failures == 0 ? 0 : 1;
}
