// Index and weight math for grid sampling, shared by the CPU and CUDA kernels.
//
// Everything here works on one axis at a time: a normalised grid coordinate in
// [-1, 1] becomes a list of K taps (input index, weight, d weight / d grid),
// where K is 1 (nearest), 2 (linear) or 4 (cubic). A kernel multiplies the
// per-axis weights of its 2 or 3 axes together.
//
// Torch's CPU kernels treat NaN and Inf coordinates differently in 4-D (a
// vectorised kernel) and 5-D (a scalar kernel); `NanPolicy` reproduces each.
#pragma once

#include "cpu_isa.h"
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define ATTN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define ATTN_HOST_DEVICE inline
#endif

namespace attnkernels {
namespace sampling {
inline namespace ATTNKERNELS_CPU_ISA {  // see cpu_isa.h

// Same numbering as torch's GridSamplerInterpolation / GridSamplerPadding.
enum class Interpolation : int64_t { Bilinear = 0, Nearest = 1, Bicubic = 2 };
enum class Padding : int64_t { Zeros = 0, Border = 1, Reflection = 2 };

// How non-finite coordinates behave, to match torch's CPU kernels:
//  - Sampler2d (4-D input, as torch's grid_sampler_2d): clipping sends NaN to
//    the low edge, and with zero padding a non-finite weight times an
//    out-of-range tap gives NaN.
//  - Sampler3d (5-D input, as torch's grid_sampler_3d): clipping sends NaN to
//    the high edge, and taps out of range are skipped, so zero padding gives 0.
enum class NanPolicy { Sampler2d, Sampler3d };

constexpr double kCubicA = -0.75;  // Keys' kernel parameter, as in torch.

// Normalised [-1, 1] to pixel units; `scale` receives d pixel / d normalised.
template <typename T>
ATTN_HOST_DEVICE T unnormalize(T coord, int64_t size, bool align_corners, T* scale) {
  if (align_corners) {
    *scale = T(size - 1) / T(2);
    return (coord + T(1)) / T(2) * T(size - 1);
  }
  *scale = T(size) / T(2);
  return ((coord + T(1)) * T(size) - T(1)) / T(2);
}

// Clip to [0, size - 1]. The gradient is 0 on and beyond each bound.
template <NanPolicy policy, typename T>
ATTN_HOST_DEVICE T clip_coordinate(T x, int64_t size, T* grad) {
  const T high = T(size - 1);
  if (x > T(0) && x < high) {
    *grad = T(1);
    return x;
  }
  *grad = T(0);
  if (x <= T(0)) return T(0);
  if (x >= high) return high;
  return policy == NanPolicy::Sampler2d ? T(0) : high;  // NaN
}

// Reflect about [low, high] = [twice_low / 2, twice_high / 2] as many times as
// needed. The gradient sign flips with each reflection. NaN stays NaN.
// The two policies are the same map, evaluated as torch's 4-D kernel (by the
// remainder of a division by twice the span) and 5-D kernel (by fmod and the
// parity of the number of flips): they differ only for huge coordinates,
// where rounding decides.
template <NanPolicy policy, typename T>
ATTN_HOST_DEVICE T reflect_coordinate(T x, int64_t twice_low, int64_t twice_high, T* grad) {
  if (twice_low == twice_high) {
    *grad = T(0);
    return T(0);
  }
  const T low = T(twice_low) / T(2);
  T shifted = x - low;
  const T sign = shifted < T(0) ? T(-1) : T(1);
  shifted = std::fabs(shifted);
  if (sizeof(T) < sizeof(double) && shifted >= T(1 << 22) && shifted <= T(3.0e38)) {
    // A huge float coordinate: torch's float division rounds the flip count and lands whole
    // pixels off. The remainder modulo twice the span, taken in double, is exact (fmod always is).
    const double twice_span = double(twice_high - twice_low);
    const double extra = std::fmod(double(shifted), twice_span);
    const bool flipped = extra > twice_span / 2;
    *grad = flipped ? -sign : sign;
    return T((flipped ? twice_span - extra : extra) + double(low));
  }
  if (policy == NanPolicy::Sampler2d) {
    const T twice_span = T(twice_high - twice_low);
    const T extra = shifted - std::trunc(shifted / twice_span) * twice_span;
    const T reflected = twice_span - extra;
    if (extra > reflected) {
      *grad = -sign;
      return reflected + low;
    }
    *grad = sign;
    return extra + low;
  }
  const T span = T(twice_high - twice_low) / T(2);
  const T extra = std::fmod(shifted, span);
  // Parity of the number of flips, computed in floating point: casting a huge
  // or NaN count to an integer would be undefined.
  const T flips = std::floor(shifted / span);
  const bool odd = std::fmod(flips, T(2)) == T(1);
  if (!odd) {
    *grad = sign;
    return extra + low;
  }
  *grad = -sign;
  return span - extra + low;
}

// Apply a padding mode to a pixel-unit coordinate: the identity for zeros,
// clip for border, reflect-then-clip for reflection. `grad` multiplies.
template <NanPolicy policy, typename T>
ATTN_HOST_DEVICE T pad_coordinate(T x, int64_t size, Padding padding, bool align_corners, T* grad) {
  *grad = T(1);
  if (padding == Padding::Border) {
    return clip_coordinate<policy>(x, size, grad);
  }
  if (padding == Padding::Reflection) {
    T reflect_grad, clip_grad;
    if (align_corners) {
      x = reflect_coordinate<policy>(x, 0, 2 * (size - 1), &reflect_grad);
    } else {
      x = reflect_coordinate<policy>(x, -1, 2 * size - 1, &reflect_grad);
    }
    x = clip_coordinate<policy>(x, size, &clip_grad);
    *grad = reflect_grad * clip_grad;
    return x;
  }
  return x;
}

// Whether an integral-valued floating coordinate lies in [0, size - 1].
// Comparing in floating point keeps NaN and huge values well defined.
template <typename T>
ATTN_HOST_DEVICE bool in_range(T x, int64_t size) {
  return x >= T(0) && x <= T(size - 1);
}

// Keys' cubic convolution weights for the 4 taps floor(x)-1 .. floor(x)+2 at
// fractional offset t, and their derivatives with respect to t.
template <typename T>
ATTN_HOST_DEVICE void cubic_weights(T t, T w[4], T dw[4]) {
  const T A = T(kCubicA);
  // |s| <= 1: ((A + 2) s - (A + 3)) s^2 + 1;  1 < |s| < 2: ((A s - 5A) s + 8A) s - 4A
  auto inner = [A](T s) { return ((A + T(2)) * s - (A + T(3))) * s * s + T(1); };
  auto outer = [A](T s) { return ((A * s - T(5) * A) * s + T(8) * A) * s - T(4) * A; };
  auto d_inner = [A](T s) { return (T(3) * (A + T(2)) * s - T(2) * (A + T(3))) * s; };
  auto d_outer = [A](T s) { return (T(3) * A * s - T(10) * A) * s + T(8) * A; };
  w[0] = outer(t + T(1));
  w[1] = inner(t);
  w[2] = inner(T(1) - t);
  w[3] = outer(T(2) - t);
  dw[0] = d_outer(t + T(1));
  dw[1] = d_inner(t);
  dw[2] = -d_inner(T(1) - t);
  dw[3] = -d_outer(T(2) - t);
}

// The taps of one axis. Taps outside the input have valid = false and index 0.
template <typename T, int K>
struct AxisTaps {
  int64_t index[K];
  T weight[K];
  T dweight[K];  // d weight / d normalised grid coordinate
  bool valid[K];
};

template <Interpolation mode>
struct TapsPerAxis;
template <>
struct TapsPerAxis<Interpolation::Nearest> { static constexpr int value = 1; };
template <>
struct TapsPerAxis<Interpolation::Bilinear> { static constexpr int value = 2; };
template <>
struct TapsPerAxis<Interpolation::Bicubic> { static constexpr int value = 4; };

// Round half to even, like nearbyint in the default rounding mode.
template <typename T>
ATTN_HOST_DEVICE T round_half_even(T x) {
  return std::nearbyint(x);
}

template <Interpolation mode, NanPolicy policy, typename T>
ATTN_HOST_DEVICE AxisTaps<T, TapsPerAxis<mode>::value> axis_taps(
    T coord, int64_t size, Padding padding, bool align_corners) {
  constexpr int K = TapsPerAxis<mode>::value;
  AxisTaps<T, K> taps;
  T scale;
  T x = unnormalize(coord, size, align_corners, &scale);
  if (mode == Interpolation::Bicubic) {
    // Weights from the unpadded coordinate; padding applies to each tap.
    const T x0 = std::floor(x);
    T w[4], dw[4];
    cubic_weights(x - x0, w, dw);
    for (int k = 0; k < K; ++k) {
      T unused;
      const T tap = pad_coordinate<policy>(x0 + T(k - 1), size, padding, align_corners, &unused);
      taps.valid[k] = in_range(tap, size);
      taps.index[k] = taps.valid[k] ? static_cast<int64_t>(tap) : 0;
      taps.weight[k] = w[k];
      taps.dweight[k] = dw[k] * scale;
    }
    return taps;
  }
  T pad_grad;
  x = pad_coordinate<policy>(x, size, padding, align_corners, &pad_grad);
  if (mode == Interpolation::Nearest) {
    const T tap = round_half_even(x);
    taps.valid[0] = in_range(tap, size);
    taps.index[0] = taps.valid[0] ? static_cast<int64_t>(tap) : 0;
    taps.weight[0] = T(1);
    taps.dweight[0] = T(0);
    return taps;
  }
  // Linear.
  const T x0 = std::floor(x);
  const T t = x - x0;
  const T slope = scale * pad_grad;
  for (int k = 0; k < K; ++k) {
    const T tap = x0 + T(k);
    taps.valid[k] = in_range(tap, size);
    taps.index[k] = taps.valid[k] ? static_cast<int64_t>(tap) : 0;
  }
  taps.weight[0] = T(1) - t;
  taps.weight[1] = t;
  taps.dweight[0] = -slope;
  taps.dweight[1] = slope;
  return taps;
}

// Base grid coordinate of output position i along an axis of n positions, as
// torch's affine_grid: linspace(-1, 1, n), times (n - 1) / n without
// align_corners; a single position sits at 0.
template <typename T>
ATTN_HOST_DEVICE T base_coordinate(int64_t i, int64_t n, bool align_corners) {
  if (n <= 1) return T(0);
  const T step = T(2) / T(n - 1);
  // Symmetric evaluation, as torch's linspace does, so the two ends are exact; fused multiply-adds,
  // as torch's compiled linspace kernel rounds (the middle of an odd n is then 5.6e-17, not 0,
  // which decides whether an infinite theta gives Inf or NaN there).
  T value = (i < n / 2) ? std::fma(step, T(i), T(-1)) : std::fma(-step, T(n - 1 - i), T(1));
  if (!align_corners) value = value * T(n - 1) / T(n);
  return value;
}

}  // namespace ATTNKERNELS_CPU_ISA
}  // namespace sampling
}  // namespace attnkernels
