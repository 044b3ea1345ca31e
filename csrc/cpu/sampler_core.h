// The CPU sampling loops shared by grid_sample and the fused affine_grid_sample.
//
// Both ops sample a channels-last copy of the input (N, [D,] H, W, C) in the
// accumulation type, so that each tap is one contiguous, vectorisable run of
// channels. They differ only in where a point's grid coordinates come from
// (a stored grid, or theta applied to the base grid) and where the gradient to
// those coordinates goes: a `CoordinateSource` supplies both.
//
// The backward scatters into private per-range copies of the input gradient,
// so that threads never contend, and sums them at the end.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../grid_sample_math.h"

namespace attnkernels {
namespace cpu {

using sampling::Interpolation;
using sampling::NanPolicy;
using sampling::Padding;

constexpr int64_t kChannelBlock = 64;

// Shapes of one sampling problem. Axis 0 is x (width), 1 is y, 2 is z.
struct SamplerShape {
  int64_t batch = 0;
  int64_t channels = 0;
  int64_t in_size[3] = {1, 1, 1};
  int64_t out_size[3] = {1, 1, 1};
  Padding padding = Padding::Zeros;
  bool align_corners = false;

  int64_t in_points() const { return in_size[0] * in_size[1] * in_size[2]; }
  int64_t out_points() const { return out_size[0] * out_size[1] * out_size[2]; }
};

constexpr int int_pow(int base, int exponent) {
  int result = 1;
  for (int i = 0; i < exponent; ++i) result *= base;
  return result;
}

// All taps of one point: the tensor product of its axes' taps.
template <typename acc_t, int Dims, Interpolation mode>
struct PointTaps {
  static constexpr int K = sampling::TapsPerAxis<mode>::value;
  static constexpr int kCount = int_pow(K, Dims);
  int64_t offset[kCount];  // of the tap's channel run within one batch item
  acc_t weight[kCount];
  acc_t dweight[kCount][Dims];  // d weight / d normalised coordinate, per axis
  bool valid[kCount];

  template <NanPolicy policy>
  void build(const acc_t* coords, const SamplerShape& s) {
    sampling::AxisTaps<acc_t, K> axes[Dims];
    for (int a = 0; a < Dims; ++a) {
      axes[a] = sampling::axis_taps<mode, policy>(coords[a], s.in_size[a], s.padding, s.align_corners);
    }
    const int64_t stride[3] = {s.channels, s.channels * s.in_size[0], s.channels * s.in_size[0] * s.in_size[1]};
    for (int t = 0; t < kCount; ++t) {
      int rest = t;
      int64_t off = 0;
      acc_t w = acc_t(1);
      bool ok = true;
      int k[Dims];
      for (int a = 0; a < Dims; ++a) {
        k[a] = rest % K;
        rest /= K;
        off += axes[a].index[k[a]] * stride[a];
        w *= axes[a].weight[k[a]];
        ok = ok && axes[a].valid[k[a]];
      }
      offset[t] = off;
      weight[t] = w;
      valid[t] = ok;
      for (int a = 0; a < Dims; ++a) {
        acc_t d = axes[a].dweight[k[a]];
        for (int b = 0; b < Dims; ++b) {
          if (b != a) d *= axes[b].weight[k[b]];
        }
        dweight[t][a] = d;
      }
    }
  }
};

// out[n, c, p] = sum over taps of weight * source[n, tap, c], for the points
// [begin, end) of the flattened (batch, output position) range.
template <typename scalar_t, typename acc_t, int Dims, Interpolation mode, NanPolicy policy, typename Source>
void sample_forward_range(const SamplerShape& s, const acc_t* source, const Source& coords,
                          scalar_t* out, int64_t begin, int64_t end) {
  const int64_t P = s.out_points();
  const int64_t C = s.channels;
  const int64_t in_batch = s.in_points() * C;
  PointTaps<acc_t, Dims, mode> taps;
  acc_t acc[kChannelBlock];
  for (int64_t i = begin; i < end; ++i) {
    const int64_t n = i / P;
    const int64_t p = i - n * P;
    acc_t xyz[Dims];
    coords.load(n, p, xyz);
    taps.template build<policy>(xyz, s);
    const acc_t* src = source + n * in_batch;
    scalar_t* dst = out + n * C * P + p;
    for (int64_t c0 = 0; c0 < C; c0 += kChannelBlock) {
      const int64_t cb = std::min(kChannelBlock, C - c0);
      for (int64_t c = 0; c < cb; ++c) acc[c] = acc_t(0);
      for (int t = 0; t < taps.kCount; ++t) {
        const acc_t w = taps.weight[t];
        if (taps.valid[t]) {
          const acc_t* run = src + taps.offset[t] + c0;
#pragma omp simd
          for (int64_t c = 0; c < cb; ++c) acc[c] += w * run[c];
        } else if (policy == NanPolicy::Planar && !std::isfinite(w)) {
          // torch's 4-D kernel multiplies the weight by a zero tap: NaN here.
          for (int64_t c = 0; c < cb; ++c) acc[c] += w * acc_t(0);
        }
      }
      for (int64_t c = 0; c < cb; ++c) dst[(c0 + c) * P] = static_cast<scalar_t>(acc[c]);
    }
  }
}

template <typename scalar_t, typename acc_t, int Dims, Interpolation mode, NanPolicy policy, typename Source>
void sample_forward(const SamplerShape& s, const acc_t* source, const Source& coords, scalar_t* out) {
  const int64_t total = s.batch * s.out_points();
  constexpr int taps = PointTaps<acc_t, Dims, mode>::kCount;
  const int64_t grain = std::max<int64_t>(16, 32768 / std::max<int64_t>(1, taps * s.channels));
  at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
    sample_forward_range<scalar_t, acc_t, Dims, mode, policy>(s, source, coords, out, begin, end);
  });
}

// Backward over points [begin, end): scatter weight * grad_output into
// `grad_source` (channels-last, private to this range) and hand the gradient
// of each point's coordinates to `coords.store_grad`, with `slot` naming the
// range so that sources which reduce (theta) keep per-range sums.
template <typename scalar_t, typename acc_t, int Dims, Interpolation mode, NanPolicy policy, typename Source>
void sample_backward_range(const SamplerShape& s, const acc_t* source, Source& coords,
                           const scalar_t* grad_out, acc_t* grad_source, bool need_coords,
                           int64_t slot, int64_t begin, int64_t end) {
  const int64_t P = s.out_points();
  const int64_t C = s.channels;
  const int64_t in_batch = s.in_points() * C;
  constexpr bool has_coord_grad = mode != Interpolation::Nearest;
  PointTaps<acc_t, Dims, mode> taps;
  acc_t g[kChannelBlock];
  for (int64_t i = begin; i < end; ++i) {
    const int64_t n = i / P;
    const int64_t p = i - n * P;
    acc_t xyz[Dims];
    coords.load(n, p, xyz);
    taps.template build<policy>(xyz, s);
    const acc_t* src = source + n * in_batch;
    const scalar_t* go = grad_out + n * C * P + p;
    acc_t grad_xyz[Dims] = {};
    for (int64_t c0 = 0; c0 < C; c0 += kChannelBlock) {
      const int64_t cb = std::min(kChannelBlock, C - c0);
      for (int64_t c = 0; c < cb; ++c) g[c] = static_cast<acc_t>(go[(c0 + c) * P]);
      for (int t = 0; t < taps.kCount; ++t) {
        if (!taps.valid[t]) continue;
        if (grad_source != nullptr) {
          acc_t* run = grad_source + n * in_batch + taps.offset[t] + c0;
          const acc_t w = taps.weight[t];
#pragma omp simd
          for (int64_t c = 0; c < cb; ++c) run[c] += w * g[c];
        }
        if (has_coord_grad && need_coords) {
          const acc_t* run = src + taps.offset[t] + c0;
          acc_t dot = acc_t(0);
#pragma omp simd reduction(+ : dot)
          for (int64_t c = 0; c < cb; ++c) dot += run[c] * g[c];
          for (int a = 0; a < Dims; ++a) grad_xyz[a] += taps.dweight[t][a] * dot;
        }
      }
    }
    if (need_coords) coords.store_grad(slot, n, p, grad_xyz);
  }
}

// How many private copies of the input gradient to keep: one per thread, as
// long as they fit in a memory budget; fewer copies means fewer threads.
inline int64_t private_copies(int64_t total_points, int64_t grad_bytes, bool need_input_grad) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t copies = std::min<int64_t>(threads, std::max<int64_t>(1, total_points / 256));
  if (need_input_grad && grad_bytes > 0) {
    constexpr int64_t kBudgetBytes = int64_t(2) << 30;  // 2 GiB of private copies at most
    copies = std::min<int64_t>(copies, std::max<int64_t>(1, kBudgetBytes / grad_bytes));
  }
  return copies;
}

// Runs the backward in `copies` contiguous ranges, each with its own slice of
// `private_grads` (copies x N x in_points x C, zeroed), in parallel.
template <typename scalar_t, typename acc_t, int Dims, Interpolation mode, NanPolicy policy, typename Source>
void sample_backward(const SamplerShape& s, const acc_t* source, Source& coords, const scalar_t* grad_out,
                     acc_t* private_grads, bool need_coords, int64_t copies) {
  const int64_t total = s.batch * s.out_points();
  const int64_t per_copy = s.batch * s.in_points() * s.channels;
  at::parallel_for(0, copies, 1, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      const int64_t begin = total * r / copies;
      const int64_t end = total * (r + 1) / copies;
      acc_t* grads = private_grads == nullptr ? nullptr : private_grads + r * per_copy;
      sample_backward_range<scalar_t, acc_t, Dims, mode, policy>(s, source, coords, grad_out, grads,
                                                                 need_coords, r, begin, end);
    }
  });
}

// Calls `body` with the interpolation mode as a compile-time constant.
template <typename Body>
void dispatch_mode(int64_t mode, Body&& body) {
  switch (static_cast<Interpolation>(mode)) {
    case Interpolation::Bilinear:
      body(std::integral_constant<Interpolation, Interpolation::Bilinear>{});
      break;
    case Interpolation::Nearest:
      body(std::integral_constant<Interpolation, Interpolation::Nearest>{});
      break;
    case Interpolation::Bicubic:
      body(std::integral_constant<Interpolation, Interpolation::Bicubic>{});
      break;
    default:
      TORCH_CHECK(false, "attnkernels: interpolation must be 0 (bilinear), 1 (nearest) or 2 (bicubic), got ", mode);
  }
}

// The input as a channels-last contiguous tensor of the accumulation type:
// (N, C, [D,] H, W) -> (N, [D,] H, W, C). Free when it already is one.
inline at::Tensor channels_last_source(const at::Tensor& input, at::ScalarType acc_type) {
  std::vector<int64_t> order = {0};
  for (int64_t d = 2; d < input.dim(); ++d) order.push_back(d);
  order.push_back(1);
  return input.to(acc_type).permute(order).contiguous();
}

// Sums the private copies (copies, N, [D,] H, W, C) and returns the input
// gradient in the input's dtype and memory format, as torch does.
inline at::Tensor reduce_private_grads(const at::Tensor& private_grads, const at::Tensor& input) {
  at::Tensor summed = private_grads.size(0) == 1 ? private_grads.select(0, 0) : private_grads.sum(0);
  std::vector<int64_t> order = {0, input.dim() - 1};
  for (int64_t d = 1; d < input.dim() - 1; ++d) order.push_back(d);
  return summed.permute(order).to(input.scalar_type()).contiguous(input.suggest_memory_format());
}

inline void read_shape(const at::Tensor& input, SamplerShape& s) {
  s.batch = input.size(0);
  s.channels = input.size(1);
  const int64_t dims = input.dim() - 2;
  for (int64_t a = 0; a < dims; ++a) s.in_size[a] = input.size(input.dim() - 1 - a);
}


}  // namespace cpu
}  // namespace attnkernels
