// Definitions of the kernel launchers declared in sampler_launch.cuh. Included only by the
// instantiation units (sampler_instances.cuh), so each kernel is compiled in one unit.
#pragma once

#include <ATen/ops/sort.h>

#include "sampler_launch.cuh"

namespace attnkernels {
namespace cuda {

// out (N, C, P) contiguous, not empty.
template <typename scalar_t, typename acc_t, int Dims, Interpolation mode, typename Source>
void launch_forward(const SamplerShape& g, const at::Tensor& input, const Source& source, at::Tensor& out) {
  constexpr NanPolicy policy = nan_policy_for<Dims>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
  const bool small = item_offsets_fit_int32(g, input);
  const bool channels_last = g.channels >= 4 && input.stride(1) == 1;
  if (small && channels_last) {
    const int64_t tiles_per_item = sampler_tiles_per_item(g);
    const int64_t tiles = g.batch * tiles_per_item;
    sample_forward_channels_last<scalar_t, acc_t, int32_t, Dims, mode, policy>
        <<<blocks_for(tiles), kSamplerThreads, 0, stream>>>(g, input_view<scalar_t, int32_t>(input), source, out_ptr,
                                                            group_log2_for(g.channels), tiles_per_item, tiles);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const int64_t tiles_per_item = ceil_div(g.out_points, kPointwiseThreads);
  const int64_t tiles = g.batch * tiles_per_item;
  if (small) {
    sample_forward_pointwise<scalar_t, acc_t, int32_t, Dims, mode, policy>
        <<<blocks_for(tiles), kPointwiseThreads, 0, stream>>>(g, input_view<scalar_t, int32_t>(input), source,
                                                              out_ptr, tiles_per_item, tiles);
  } else {
    sample_forward_pointwise<scalar_t, acc_t, int64_t, Dims, mode, policy>
        <<<blocks_for(tiles), kPointwiseThreads, 0, stream>>>(g, input_view<scalar_t, int64_t>(input), source,
                                                              out_ptr, tiles_per_item, tiles);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The atomic backward (sample_backward_kernel). grad_out (N, C, P) contiguous;
// grad_buffer (N, in_points, C) zeroed, or null for no input gradient.
template <typename scalar_t, typename acc_t, int Dims, Interpolation mode, typename Source>
void launch_backward(const SamplerShape& g, const at::Tensor& input, const Source& source,
                     const at::Tensor& grad_out, acc_t* grad_buffer, bool need_coords) {
  constexpr NanPolicy policy = nan_policy_for<Dims>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t tiles_per_item = sampler_tiles_per_item(g);
  const int64_t tiles = g.batch * tiles_per_item;
  const int group_log2 = group_log2_for(g.channels);
  const scalar_t* go = grad_out.const_data_ptr<scalar_t>();
  if (item_offsets_fit_int32(g, input)) {
    sample_backward_kernel<scalar_t, acc_t, int32_t, Dims, mode, policy>
        <<<blocks_for(tiles), kSamplerThreads, 0, stream>>>(g, input_view<scalar_t, int32_t>(input), source, go,
                                                            grad_buffer, need_coords, group_log2, tiles_per_item,
                                                            tiles);
  } else {
    sample_backward_kernel<scalar_t, acc_t, int64_t, Dims, mode, policy>
        <<<blocks_for(tiles), kSamplerThreads, 0, stream>>>(g, input_view<scalar_t, int64_t>(input), source, go,
                                                            grad_buffer, need_coords, group_log2, tiles_per_item,
                                                            tiles);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The bitwise-reproducible input gradient (see sampler_kernels.cuh): keys,
// a stable sort, and one writer per (input position, channel).
template <typename scalar_t, typename acc_t, int Dims, Interpolation mode, typename Source>
void deterministic_input_grad(const SamplerShape& g, const Source& source, const at::Tensor& grad_out,
                              at::Tensor& grad_buffer) {
  constexpr NanPolicy policy = nan_policy_for<Dims>();
  constexpr int kTaps = PointTaps<acc_t, Dims, mode, policy>::kCount;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t pairs = g.batch * g.out_points * kTaps;
  const int64_t chunks = ceil_div(g.channels, kWarpSize);
  TORCH_CHECK(chunks <= 65535, "attnkernels: the deterministic grid_sample backward supports at most ",
              65535 * kWarpSize, " channels, got ", g.channels);
  at::Tensor keys = at::empty({pairs}, grad_buffer.options().dtype(at::kLong));
  at::Tensor weights = at::empty({pairs}, grad_buffer.options());
  const int64_t tiles_per_item = ceil_div(g.out_points, kPointwiseThreads);
  const int64_t tiles = g.batch * tiles_per_item;
  tap_keys_kernel<acc_t, Dims, mode, policy><<<blocks_for(tiles), kPointwiseThreads, 0, stream>>>(
      g, source, keys.mutable_data_ptr<int64_t>(), weights.mutable_data_ptr<acc_t>(), tiles_per_item, tiles);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const auto sorted = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor& sorted_keys = std::get<0>(sorted);
  const at::Tensor& order = std::get<1>(sorted);
  constexpr int kRows = kPointwiseThreads / kWarpSize;
  const dim3 block(kWarpSize, kRows);
  const dim3 grid(blocks_for(ceil_div(pairs, kRows)), static_cast<unsigned int>(chunks));
  sum_sorted_taps_kernel<scalar_t, acc_t><<<grid, block, 0, stream>>>(
      sorted_keys.const_data_ptr<int64_t>(), order.const_data_ptr<int64_t>(), weights.const_data_ptr<acc_t>(),
      grad_out.const_data_ptr<scalar_t>(), grad_buffer.mutable_data_ptr<acc_t>(), pairs, kTaps, g.channels,
      g.out_points);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace attnkernels
