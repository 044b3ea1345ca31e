// What the CPU and CUDA samplers share on the host: the shape of one sampling
// problem, the dispatch of the interpolation mode and the number of spatial
// dims to compile-time constants, and small integer math. Plain C++17, also
// compiled by nvcc (host code, plus `int_pow` in device code).
#pragma once

#include "cpu_isa.h"
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <type_traits>
#include <vector>

#include "grid_sample_math.h"

namespace attnkernels {
namespace sampling {
inline namespace ATTNKERNELS_CPU_ISA {  // see cpu_isa.h

constexpr int int_pow(int base, int exponent) {
  int result = 1;
  for (int i = 0; i < exponent; ++i) result *= base;
  return result;
}

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Sizes of one sampling problem. Axis 0 is x (width), 1 is y, 2 is z; the
// point counts are stored, not recomputed, as the CUDA kernels read them per
// point. Trivially copyable: CUDA kernels take it by value.
struct SamplerShape {
  int64_t batch = 0;
  int64_t channels = 0;
  int64_t in_size[3] = {1, 1, 1};
  int64_t out_size[3] = {1, 1, 1};
  int64_t in_points = 1;
  int64_t out_points = 1;
  Padding padding = Padding::Zeros;
  bool align_corners = false;
};

// The shape of sampling `input` (N, C, [D,] H, W) at an output of `out_size`
// (axis order x, y, z; one entry per spatial dim of the input).
inline SamplerShape make_sampler_shape(const at::Tensor& input, const int64_t* out_size, int64_t padding,
                                       bool align_corners) {
  SamplerShape s;
  const int64_t dims = input.dim() - 2;
  s.batch = input.size(0);
  s.channels = input.size(1);
  for (int64_t a = 0; a < dims; ++a) {
    s.in_size[a] = input.size(input.dim() - 1 - a);
    s.out_size[a] = out_size[a];
  }
  s.in_points = s.in_size[0] * s.in_size[1] * s.in_size[2];
  s.out_points = s.out_size[0] * s.out_size[1] * s.out_size[2];
  s.padding = static_cast<Padding>(padding);
  s.align_corners = align_corners;
  return s;
}

// grid_sample: the output positions are the grid's (N, [Do,] Ho, Wo, Dims).
inline SamplerShape grid_sample_shape(const at::Tensor& input, const at::Tensor& grid, int64_t padding,
                                      bool align_corners) {
  int64_t out_size[3] = {1, 1, 1};
  for (int64_t a = 0; a < input.dim() - 2; ++a) out_size[a] = grid.size(grid.dim() - 2 - a);
  return make_sampler_shape(input, out_size, padding, align_corners);
}

// affine_grid_sample: the output positions are those of `size` (N, C, [D,] H, W).
inline SamplerShape affine_grid_sample_shape(const at::Tensor& input, at::IntArrayRef size, int64_t padding,
                                             bool align_corners) {
  int64_t out_size[3] = {1, 1, 1};
  for (int64_t a = 0; a < input.dim() - 2; ++a) out_size[a] = size[size.size() - 1 - a];
  return make_sampler_shape(input, out_size, padding, align_corners);
}

// The grid affine_grid makes for an output of `size`: (N, [D,] H, W, Dims).
inline std::vector<int64_t> grid_shape(at::IntArrayRef size) {
  std::vector<int64_t> shape = {size[0]};
  for (size_t d = 2; d < size.size(); ++d) shape.push_back(size[d]);
  shape.push_back(static_cast<int64_t>(size.size()) - 2);
  return shape;
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

// Calls `body` with the number of spatial dimensions (2 or 3) as a compile-time constant.
template <typename Body>
void dispatch_dims(int64_t dims, Body&& body) {
  if (dims == 2) {
    body(std::integral_constant<int, 2>{});
  } else {
    TORCH_CHECK(dims == 3, "attnkernels: expected 2 or 3 spatial dimensions, got ", dims);
    body(std::integral_constant<int, 3>{});
  }
}

// 4-D input follows torch's 2-D CPU kernel for non-finite coordinates, 5-D
// input its 3-D one (see NanPolicy).
template <int Dims>
constexpr NanPolicy nan_policy_for() {
  return Dims == 2 ? NanPolicy::Sampler2d : NanPolicy::Sampler3d;
}

}  // namespace ATTNKERNELS_CPU_ISA
}  // namespace sampling

// The CPU and CUDA samplers use the shared names unqualified.
namespace cpu {
inline namespace ATTNKERNELS_CPU_ISA {
using namespace sampling;
}  // namespace ATTNKERNELS_CPU_ISA
}  // namespace cpu
namespace cuda {
using namespace sampling;
}  // namespace cuda

}  // namespace attnkernels
