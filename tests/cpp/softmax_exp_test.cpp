// Unit test of the softmax passes of csrc/cpu/attention_math.h as each CPU variant compiles them:
// exp2_shifted_sum (values[i] = 2^((values[i] - shift) * to_log2), returning their sum), the scalar
// exp2_nonpositive, and max_of against double precision, on every tail length of the vector loops,
// for scores in units of log2 (to_log2 = 1) and natural ones (to_log2 = log2(e)). exp2 may be off by
// a few units in the last place (a polynomial), never more: relative error <= 2e-7 (under 2 ulp)
// where the result is a normal float; at most 2^-126 below that, exactly 0 for -inf and far below
// the shift; NaN stays NaN; and a shift slightly below a value (the backward's lse after rounding)
// still gives 2^ of a small positive number.
// Built by tests/test_softmax_math.py; prints "skip" on a CPU without the variant's instructions.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "cpu/attention_math.h"

namespace math = attnkernels::cpu::ATTNKERNELS_CPU_ISA;

static int failures = 0;

static void fail(const char* what, double got, double want, double x) {
  if (++failures <= 10) std::printf("%s: 2^(%.9g) gave %.9g, expected %.9g\n", what, x, got, want);
}

constexpr float kLog2e = 1.44269504088896341f;

// One result against 2^t in double precision.
static void check_one(const char* what, double got, double t) {
  const double want = std::exp2(t);
  if (t < -150.0) {
    if (got != 0.0) fail(what, got, 0.0, t);
  } else if (t >= -126.0) {  // a normal float32 result
    if (!(std::abs(got - want) <= 2e-7 * want)) fail(what, got, want, t);
  } else if (!(got >= 0.0 && got <= std::exp2(-126.0))) {  // may be flushed or inaccurate below 2^-126
    fail(what, got, want, t);
  }
}

// exp2_shifted_sum over values, checked element by element and in the sum; the scalar exp2 too.
static void check_exp(std::vector<float> values, float shift, float to_log2 = 1.0f) {
  const std::vector<float> inputs = values;
  const float sum = math::exp2_shifted_sum(values.data(), static_cast<int64_t>(values.size()), shift, to_log2);
  double want_sum = 0;
  bool nan_seen = false;
  for (size_t i = 0; i < values.size(); ++i) {
    // The kernels subtract (and convert) in float32: the test checks 2^ of that exponent.
    const float exponent = (inputs[i] - shift) * to_log2;
    const double t = static_cast<double>(exponent);
    const double got = values[i];
    if (std::isnan(inputs[i])) {
      nan_seen = true;
      if (!std::isnan(got)) fail("NaN input", got, NAN, t);
      if (!std::isnan(math::exp2_nonpositive(exponent))) fail("NaN input, scalar", got, NAN, t);
      continue;
    }
    want_sum += std::exp2(t);
    check_one("vector", got, t);
    check_one("scalar", math::exp2_nonpositive(exponent), t);
  }
  if (nan_seen ? !std::isnan(sum) : !(std::abs(sum - want_sum) <= 1e-6 * want_sum + 1e-30)) {
    fail("sum", sum, want_sum, shift);
  }
}

#if defined(ATTNKERNELS_BF16_TARGET)
// exp2_shifted_sum_rounded: the same sum as exp2_shifted_sum, bit for bit, and each value rounded to
// bfloat16 to nearest even (denormals may go to 0, as the conversion instruction flushes them); the
// scores and what follows the n outputs are left as they were.
static void check_rounded(const std::vector<float>& inputs, float shift, float to_log2) {
  const int64_t n = static_cast<int64_t>(inputs.size());
  std::vector<float> values = inputs;
  const float sum = math::exp2_shifted_sum(values.data(), n, shift, to_log2);
  constexpr uint16_t kSentinel = 0x1234;
  std::vector<uint16_t> rounded(n + 3, kSentinel);
  const std::vector<float> scores = inputs;
  const float rounded_sum = math::exp2_shifted_sum_rounded(scores.data(), n, shift, to_log2, rounded.data());
  uint32_t sum_bits, rounded_sum_bits;
  std::memcpy(&sum_bits, &sum, 4);
  std::memcpy(&rounded_sum_bits, &rounded_sum, 4);
  if (sum_bits != rounded_sum_bits) fail("rounded pass's sum", rounded_sum, sum, shift);
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, &values[i], 4);
    const bool is_nan = std::isnan(values[i]);
    const uint16_t nearest_even = static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
    const uint16_t got = rounded[i];
    const bool nan_kept = is_nan && (got & 0x7F80u) == 0x7F80u && (got & 0x7Fu) != 0;
    const bool flushed = std::abs(values[i]) < std::ldexp(1.0f, -126) && (got & 0x7FFFu) == 0;
    if (!(nan_kept || flushed || (!is_nan && got == nearest_even))) fail("rounded value", got, nearest_even, inputs[i]);
  }
  for (int64_t i = n; i < n + 3; ++i) {
    if (rounded[i] != kSentinel) fail("rounded pass wrote past n", rounded[i], kSentinel, static_cast<double>(i));
  }
  if (n > 0 && std::memcmp(scores.data(), inputs.data(), n * sizeof(float)) != 0) {
    fail("rounded pass changed the scores", 0, 0, shift);
  }
}
#endif

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
  // A sweep of t = value - shift over [-155, 0] (every exponent the result can have, the
  // denormals too), for shifts whose own rounding differs; then natural units over [-110, 0].
  for (float shift : {0.0f, 3.25f, -17.5f, 127.0f, 1000.0f}) {
    std::vector<float> values;
    for (double t = -155.0; t <= 0.0; t += 1.0 / 1024 + 1e-5) values.push_back(static_cast<float>(shift + t));
    values.push_back(shift);
    check_exp(values, shift);
    values.clear();
    for (double x = -110.0; x <= 0.0; x += 1.0 / 1024 + 1e-5) values.push_back(static_cast<float>(shift + x));
    check_exp(values, shift, kLog2e);
  }
  // Slightly positive (rounding in the backward's lse) and every tail length of the 8- and 16-wide loops.
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> near(-30.0f, 0.01f);
  for (int n = 0; n <= 40; ++n) {
    std::vector<float> values(n);
    for (float& v : values) v = near(rng);
    check_exp(values, 0.0f);
    check_exp(values, 0.0f, kLog2e);
  }
  // Far above the shift (not a softmax input, but an inconsistent lse could give one): clamped
  // to 2^127, never garbage.
  {
    std::vector<float> values = {200.0f, 127.0f, 1e30f, 128.0f, 0.0f, 126.6f, 300.0f, 127.5f, 131.0f};
    const std::vector<float> inputs = values;
    math::exp2_shifted_sum(values.data(), static_cast<int64_t>(values.size()), 0.0f, 1.0f);
    for (size_t i = 0; i < values.size(); ++i) {
      const double limit = std::exp2(static_cast<double>(std::min(inputs[i], 127.0f)));
      if (!(std::abs(values[i] - limit) <= 2e-7 * limit)) fail("above 127", values[i], limit, inputs[i]);
      const double scalar = math::exp2_nonpositive(inputs[i]);
      if (!(std::abs(scalar - limit) <= 2e-7 * limit)) fail("above 127, scalar", scalar, limit, inputs[i]);
    }
  }
  // Non-finite values: -inf gives exactly 0, NaN stays NaN (in the sum too).
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  for (float to_log2 : {1.0f, kLog2e}) {
    check_exp({-inf, 0.0f, -1.0f, -inf, -130.0f, -127.0f, -126.0f, -1e30f, -0.0f, -inf, -2.0f, -160.0f}, 0.0f,
              to_log2);
    check_exp({-inf, 0.0f, nan, -1.0f, -3.0f, -inf, -0.5f, -7.0f, -9.0f, nan, -2.0f}, 0.0f, to_log2);
  }
  {
    std::vector<float> values(19, -inf);
    math::exp2_shifted_sum(values.data(), 19, 0.0f, 1.0f);
    for (float v : values) {
      if (v != 0.0f) fail("-inf", v, 0.0, -inf);
    }
    if (math::exp2_nonpositive(-inf) != 0.0f) fail("-inf, scalar", math::exp2_nonpositive(-inf), 0.0, -inf);
  }
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
#if defined(ATTNKERNELS_BF16_TARGET)
  if (__builtin_cpu_supports("avx512bf16")) {
    std::mt19937 rounding_rng(11);
    std::uniform_real_distribution<float> scores(-40.0f, 0.0f);
    for (int n = 0; n <= 40; ++n) {
      std::vector<float> values(n);
      for (float& v : values) v = scores(rounding_rng);
      for (float to_log2 : {1.0f, kLog2e}) check_rounded(values, 0.0f, to_log2);
    }
    std::vector<float> sweep;
    for (double t = -155.0; t <= 0.0; t += 1.0 / 256 + 1e-5) sweep.push_back(static_cast<float>(3.25 + t));
    check_rounded(sweep, 3.25f, 1.0f);
    for (float to_log2 : {1.0f, kLog2e}) {
      check_rounded({-inf, 0.0f, nan, -1.0f, -3.0f, -inf, -0.5f, -7.0f, -9.0f, nan, -2.0f, -130.0f, -149.0f}, 0.0f,
                    to_log2);
    }
  }
#endif
  std::printf(failures == 0 ? "ok\n" : "%d failures\n", failures);
  return failures == 0 ? 0 : 1;
}
