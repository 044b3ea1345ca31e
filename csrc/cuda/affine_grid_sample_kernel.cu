// Fused affine_grid + grid_sample on CUDA: each point's sampling coordinates
// are computed from theta on the fly, so the grid is never stored. The
// gradient to theta is reduced per block (in double) to one partial sum per
// tile and the partials are summed in a fixed order: no atomics. Same outputs,
// layouts and empty-tensor conventions as csrc/cpu/affine_grid_sample_kernel.cpp.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAGuard.h>

#include "../sampling_checks.h"
#include "cuda_kernels.h"
#include "sampler_launch.cuh"

namespace attnkernels {
namespace cuda {
namespace {

template <typename acc_t, int Dims>
AffineSource<acc_t, Dims> affine_source(const at::Tensor& theta_acc, const SamplerShape& g, double* partials) {
  AffineSource<acc_t, Dims> source{};
  source.theta = theta_acc.const_data_ptr<acc_t>();
  for (int a = 0; a < 3; ++a) source.out_size[a] = g.out_size[a];
  source.align_corners = g.align_corners;
  source.partials = partials;
  return source;
}

}  // namespace

// The entry points (cuda_kernels.h).
at::Tensor affine_grid_sample_cuda(const at::Tensor& input, const at::Tensor& theta, at::IntArrayRef size,
                                   int64_t interpolation, int64_t padding, bool align_corners) {
  check_affine_grid_sample_args(input, theta, size, interpolation, padding);
  const c10::cuda::CUDAGuard device_guard(input.device());
  at::Tensor out = at::empty(size, input.options());
  if (out.numel() == 0) return out;
  const SamplerShape g = affine_grid_sample_shape(input, size, padding, align_corners);
  const int64_t dims = input.dim() - 2;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "affine_grid_sample_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor theta_acc = theta.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    dispatch_mode(interpolation, [&](auto mode_tag) {
      constexpr Interpolation mode = decltype(mode_tag)::value;
      dispatch_dims(dims, [&](auto dims_tag) {
        constexpr int D = decltype(dims_tag)::value;
        launch_forward<scalar_t, acc_t, D, mode>(g, input, affine_source<acc_t, D>(theta_acc, g, nullptr), out);
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> affine_grid_sample_backward_cuda(const at::Tensor& grad_output,
                                                                    const at::Tensor& input, const at::Tensor& theta,
                                                                    at::IntArrayRef size, int64_t interpolation,
                                                                    int64_t padding, bool align_corners,
                                                                    std::array<bool, 2> output_mask) {
  check_affine_grid_sample_args(input, theta, size, interpolation, padding);
  check_affine_grid_sample_grad_output(grad_output, input, size);
  const c10::cuda::CUDAGuard device_guard(input.device());
  const bool need_input = output_mask[0];
  const bool need_theta = output_mask[1];
  const int64_t dims = input.dim() - 2;
  const SamplerShape g = affine_grid_sample_shape(input, size, padding, align_corners);
  const bool has_work = g.batch * g.out_points > 0 && g.channels > 0;

  at::Tensor grad_input;
  at::Tensor grad_theta;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "affine_grid_sample_backward_cuda",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    at::Tensor buffer = need_input ? input_grad_buffer(input, acc_type) : at::Tensor();
    grad_theta = at::zeros(theta.sizes(), theta.options());
    // Nearest sampling has a zero theta gradient: nothing to compute.
    const bool compute_theta_grad = need_theta && interpolation != 1;
    if (has_work && (need_input || compute_theta_grad)) {
      const at::Tensor theta_acc = theta.to(acc_type).contiguous();
      const at::Tensor go = grad_output.contiguous();
      const bool deterministic = need_input && deterministic_requested();
      const int64_t tiles_per_item = sampler_tiles_per_item(g);
      const int64_t entries = dims * (dims + 1);
      at::Tensor partials = compute_theta_grad
                                ? at::empty({g.batch * tiles_per_item, entries}, theta.options().dtype(at::kDouble))
                                : at::Tensor();
      dispatch_mode(interpolation, [&](auto mode_tag) {
        constexpr Interpolation mode = decltype(mode_tag)::value;
        dispatch_dims(dims, [&](auto dims_tag) {
          constexpr int D = decltype(dims_tag)::value;
          const AffineSource<acc_t, D> source = affine_source<acc_t, D>(
              theta_acc, g, compute_theta_grad ? partials.mutable_data_ptr<double>() : nullptr);
          acc_t* atomic_buffer = need_input && !deterministic ? buffer.mutable_data_ptr<acc_t>() : nullptr;
          if (compute_theta_grad || atomic_buffer != nullptr) {
            launch_backward<scalar_t, acc_t, D, mode>(g, input, source, go, atomic_buffer, compute_theta_grad);
          }
          if (deterministic) deterministic_input_grad<scalar_t, acc_t, D, mode>(g, source, go, buffer);
        });
      });
      if (compute_theta_grad) {
        grad_theta = partials.view({g.batch, tiles_per_item, dims, dims + 1}).sum(1).to(theta.scalar_type());
      }
    }
    if (need_input) grad_input = input_grad_from_buffer(buffer, input);
  });
  if (!need_input) grad_input = at::empty({0}, input.options());
  if (!need_theta) grad_theta = at::empty({0}, theta.options());
  return {grad_input, grad_theta};
}

}  // namespace cuda
}  // namespace attnkernels
