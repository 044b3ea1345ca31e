// grid_sample on CUDA: forward and backward, 4-D and 5-D, every mode and
// padding of the CPU backend (bicubic on 5-D input is tricubic),
// fp16/bf16/fp32/fp64 with fp32 accumulation for the half types. Same
// outputs, layouts and empty-tensor conventions as csrc/cpu/grid_sample_kernel.cpp.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>

#include "../sampling_checks.h"
#include "cuda_kernels.h"
#include "sampler_launch.cuh"

namespace attnkernels {
namespace cuda {
namespace {

}  // namespace

// The entry points (cuda_kernels.h).
at::Tensor grid_sample_cuda(const at::Tensor& input, const at::Tensor& grid, int64_t interpolation,
                                    int64_t padding, bool align_corners) {
  check_grid_sample_args(input, grid, interpolation, padding);
  const c10::cuda::CUDAGuard device_guard(input.device());
  const int64_t dims = input.dim() - 2;
  std::vector<int64_t> out_shape = {input.size(0), input.size(1)};
  for (int64_t d = 1; d <= dims; ++d) out_shape.push_back(grid.size(d));
  at::Tensor out = at::empty(out_shape, input.options());
  if (out.numel() == 0) return out;

  const SamplerShape g = grid_sample_shape(input, grid, padding, align_corners);
  const at::Tensor grid_c = grid.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "grid_sample_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_mode(interpolation, [&](auto mode_tag) {
      constexpr Interpolation mode = decltype(mode_tag)::value;
      dispatch_dims(dims, [&](auto dims_tag) {
        constexpr int D = decltype(dims_tag)::value;
        const GridSource<scalar_t, acc_t, D> source{grid_c.const_data_ptr<scalar_t>(), nullptr, g.out_points};
        launch_forward<scalar_t, acc_t, D, mode>(g, input, source, out);
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> grid_sample_backward_cuda(const at::Tensor& grad_output, const at::Tensor& input,
                                                             const at::Tensor& grid, int64_t interpolation,
                                                             int64_t padding, bool align_corners,
                                                             std::array<bool, 2> output_mask) {
  check_grid_sample_args(input, grid, interpolation, padding);
  check_grad_output(grad_output, input, grid);
  TORCH_CHECK(grad_output.device() == input.device(), "attnkernels: expected `grad_output` on the device of `input` (",
              input.device(), "), got ", grad_output.device());
  const c10::cuda::CUDAGuard device_guard(input.device());
  const bool need_input = output_mask[0];
  const bool need_grid = output_mask[1];
  const int64_t dims = input.dim() - 2;
  const SamplerShape g = grid_sample_shape(input, grid, padding, align_corners);
  const bool has_work = g.batch * g.out_points > 0 && g.channels > 0;

  at::Tensor grad_input;
  at::Tensor grad_grid;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "grid_sample_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    at::Tensor buffer = need_input ? input_grad_buffer(input, acc_type) : at::Tensor();
    // Nearest sampling has a zero grid gradient: nothing to compute.
    const bool compute_grid_grad = need_grid && has_work && interpolation != 1;
    if (need_grid) {
      grad_grid = compute_grid_grad ? at::empty(grid.sizes(), grid.options())
                                    : at::zeros(grid.sizes(), grid.options());
    }
    if (has_work && (need_input || compute_grid_grad)) {
      const at::Tensor grid_c = grid.contiguous();
      const at::Tensor go = grad_output.contiguous();
      const bool deterministic = need_input && deterministic_requested();
      dispatch_mode(interpolation, [&](auto mode_tag) {
        constexpr Interpolation mode = decltype(mode_tag)::value;
        dispatch_dims(dims, [&](auto dims_tag) {
          constexpr int D = decltype(dims_tag)::value;
          const GridSource<scalar_t, acc_t, D> source{
              grid_c.const_data_ptr<scalar_t>(), compute_grid_grad ? grad_grid.mutable_data_ptr<scalar_t>() : nullptr,
              g.out_points};
          acc_t* atomic_buffer = need_input && !deterministic ? buffer.mutable_data_ptr<acc_t>() : nullptr;
          if (compute_grid_grad || atomic_buffer != nullptr) {
            launch_backward<scalar_t, acc_t, D, mode>(g, input, source, go, atomic_buffer, compute_grid_grad);
          }
          if (deterministic) deterministic_input_grad<scalar_t, acc_t, D, mode>(g, source, go, buffer);
        });
      });
    }
    if (need_input) grad_input = input_grad_from_buffer(buffer, input);
  });
  // The op's schema always returns two tensors: an unrequested gradient is empty.
  if (!need_input) grad_input = at::empty({0}, input.options());
  if (!need_grid) grad_grid = at::empty({0}, grid.options());
  return {grad_input, grad_grid};
}

}  // namespace cuda
}  // namespace attnkernels
