// affine_grid on CUDA: grid (N, [D,] H, W, Dims) = base grid @ theta^T, one
// thread per point; and its gradient to theta, reduced per block (in double)
// to one partial per tile, the partials summed in a fixed order. Same
// outputs as csrc/cpu/affine_grid_kernel.cpp.
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
AffineSource<acc_t, Dims> affine_source(const acc_t* theta, at::IntArrayRef size, bool align_corners,
                                        double* partials) {
  AffineSource<acc_t, Dims> source{};
  source.theta = theta;
  for (int a = 0; a < 3; ++a) source.out_size[a] = a < Dims ? size[size.size() - 1 - a] : 1;
  source.align_corners = align_corners;
  source.partials = partials;
  return source;
}

}  // namespace

// The entry points (cuda_kernels.h).
at::Tensor affine_grid_cuda(const at::Tensor& theta, at::IntArrayRef size, bool align_corners) {
  check_affine_args(theta, size);
  const c10::cuda::CUDAGuard device_guard(theta.device());
  at::Tensor grid = at::empty(grid_shape(size), theta.options());
  if (grid.numel() == 0) return grid;
  const int64_t dims = static_cast<int64_t>(size.size()) - 2;
  const int64_t points = grid.numel() / (size[0] * dims);
  const int64_t tiles_per_item = ceil_div(points, kPointwiseThreads);
  const int64_t tiles = size[0] * tiles_per_item;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, theta.scalar_type(), "affine_grid_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor theta_acc = theta.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    dispatch_dims(dims, [&](auto dims_tag) {
      constexpr int D = decltype(dims_tag)::value;
      affine_grid_kernel<scalar_t, acc_t, D><<<blocks_for(tiles), kPointwiseThreads, 0, stream>>>(
          affine_source<acc_t, D>(theta_acc.const_data_ptr<acc_t>(), size, align_corners, nullptr),
          grid.mutable_data_ptr<scalar_t>(), points, tiles_per_item, tiles);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grid;
}

// grad_theta[n, r, a] = sum over positions p of grad_grid[n, p, r] * base[p, a].
at::Tensor affine_grid_backward_cuda(const at::Tensor& grad_grid, at::IntArrayRef size, bool align_corners) {
  TORCH_CHECK(size.size() == 4 || size.size() == 5, "attnkernels: expected `size` of length 4 or 5, got ", size);
  const int64_t dims = static_cast<int64_t>(size.size()) - 2;
  TORCH_CHECK(grad_grid.sizes() == at::IntArrayRef(grid_shape(size)), "attnkernels: `grad_grid` has sizes ",
              grad_grid.sizes(), ", expected ", at::IntArrayRef(grid_shape(size)));
  TORCH_CHECK(at::isFloatingType(grad_grid.scalar_type()),
              "attnkernels: expected `grad_grid` to be a floating point tensor, got ", grad_grid.scalar_type());
  const c10::cuda::CUDAGuard device_guard(grad_grid.device());
  const int64_t points = size[0] == 0 ? 0 : grad_grid.numel() / (size[0] * dims);
  if (size[0] == 0 || points == 0) return at::zeros({size[0], dims, dims + 1}, grad_grid.options());
  const int64_t tiles_per_item = ceil_div(points, kPointwiseThreads);
  const int64_t tiles = size[0] * tiles_per_item;
  at::Tensor partials = at::empty({tiles, dims * (dims + 1)}, grad_grid.options().dtype(at::kDouble));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor g = grad_grid.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_grid.scalar_type(), "affine_grid_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_dims(dims, [&](auto dims_tag) {
      constexpr int D = decltype(dims_tag)::value;
      affine_grid_backward_kernel<scalar_t, acc_t, D><<<blocks_for(tiles), kPointwiseThreads, 0, stream>>>(
          affine_source<acc_t, D>(nullptr, size, align_corners, partials.mutable_data_ptr<double>()),
          g.const_data_ptr<scalar_t>(), points, tiles_per_item, tiles);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return partials.view({size[0], tiles_per_item, dims, dims + 1}).sum(1).to(grad_grid.scalar_type());
}

}  // namespace cuda
}  // namespace attnkernels
