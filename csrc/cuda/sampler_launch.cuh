// Host-side launchers of the CUDA sampling kernels (sampler_kernels.cuh), shared
// by grid_sample and the fused affine_grid_sample: kernel and index-type
// choice, launch shapes, the deterministic input-gradient path, and the
// conversion of the channels-last gradient buffer to the input's layout.
#pragma once

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "sampler_kernels.cuh"

namespace attnkernels {
namespace cuda {

inline bool fits_int32(int64_t extent) { return extent <= std::numeric_limits<int32_t>::max(); }

// One past the largest element offset within one batch item of `t`.
inline int64_t item_extent(const at::Tensor& t) {
  int64_t extent = 1;
  for (int64_t d = 1; d < t.dim(); ++d) extent += (t.size(d) - 1) * t.stride(d);
  return extent;
}

// Blocks for a grid-stride loop over `tiles` (the kernels loop when capped).
inline unsigned int blocks_for(int64_t tiles) {
  return static_cast<unsigned int>(std::min<int64_t>(tiles, int64_t(1) << 30));
}

// log2 of the lane-group width: the smallest power of two >= channels, at most 32.
inline int group_log2_for(int64_t channels) {
  int log2 = 0;
  while ((int64_t(1) << log2) < channels && log2 < 5) ++log2;
  return log2;
}

inline int64_t sampler_tiles_per_item(const SamplerShape& g) {
  return ceil_div(g.out_points, kPointsPerSamplerTile);
}

// Whether every per-item offset of the sampling kernels fits in int32.
inline bool item_offsets_fit_int32(const SamplerShape& g, const at::Tensor& input) {
  return fits_int32(item_extent(input)) && fits_int32(g.channels * g.out_points) &&
         fits_int32(g.channels * g.in_points) && fits_int32(g.out_points + kPointsPerSamplerTile);
}

template <typename scalar_t, typename index_t>
InputView<scalar_t, index_t> input_view(const at::Tensor& input) {
  InputView<scalar_t, index_t> view{};
  view.data = input.const_data_ptr<scalar_t>();
  view.stride_batch = input.stride(0);
  view.stride_channel = static_cast<index_t>(input.stride(1));
  const int64_t dims = input.dim() - 2;
  for (int64_t a = 0; a < 3; ++a) {
    view.stride[a] = a < dims ? static_cast<index_t>(input.stride(input.dim() - 1 - a)) : 0;
  }
  return view;
}

// The kernel launchers. Declared here and defined in sampler_launch_impl.cuh, which only the
// instantiation units (sampler_instances_*.cu, one per dtype and direction) include: the op files
// stay light, and the kernels compile in parallel, one unit per job.

// out (N, C, P) contiguous, not empty.
template <typename scalar_t, typename acc_t, int Dims, Interpolation mode, typename Source>
void launch_forward(const SamplerShape& g, const at::Tensor& input, const Source& source, at::Tensor& out);

// The atomic backward (sample_backward_kernel). grad_out (N, C, P) contiguous;
// grad_buffer (N, in_points, C) zeroed, or null for no input gradient.
template <typename scalar_t, typename acc_t, int Dims, Interpolation mode, typename Source>
void launch_backward(const SamplerShape& g, const at::Tensor& input, const Source& source,
                     const at::Tensor& grad_out, acc_t* grad_buffer, bool need_coords);

// The bitwise-reproducible input gradient (see sampler_kernels.cuh): keys,
// a stable sort, and one writer per (input position, channel).
template <typename scalar_t, typename acc_t, int Dims, Interpolation mode, typename Source>
void deterministic_input_grad(const SamplerShape& g, const Source& source, const at::Tensor& grad_out,
                              at::Tensor& grad_buffer);

// Whether the input gradient must be bitwise reproducible.
inline bool deterministic_requested() { return at::globalContext().deterministicAlgorithms(); }

// A zeroed channels-last accumulation buffer (N, [D,] H, W, C) for the input gradient.
inline at::Tensor input_grad_buffer(const at::Tensor& input, at::ScalarType acc_type) {
  std::vector<int64_t> shape = {input.size(0)};
  for (int64_t d = 2; d < input.dim(); ++d) shape.push_back(input.size(d));
  shape.push_back(input.size(1));
  return at::zeros(shape, input.options().dtype(acc_type));
}

// The buffer as the input gradient, in the input's dtype: channels-last for
// a channels-last input that is not also contiguous, else contiguous, as the
// CPU kernels and the fake kernels (attnkernels/_library/sampling.py) give it.
inline at::Tensor input_grad_from_buffer(const at::Tensor& buffer, const at::Tensor& input) {
  std::vector<int64_t> order = {0, input.dim() - 1};
  for (int64_t d = 1; d < input.dim() - 1; ++d) order.push_back(d);
  const auto channels_last_format =
      input.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d;
  const bool channels_last = !input.is_contiguous() && input.is_contiguous(channels_last_format);
  return buffer.permute(order).to(input.scalar_type()).contiguous(channels_last ? channels_last_format
                                                                                : at::MemoryFormat::Contiguous);
}

}  // namespace cuda
}  // namespace attnkernels
