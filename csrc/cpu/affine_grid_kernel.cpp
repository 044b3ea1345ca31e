// affine_grid on the CPU: grid (N, [D,] H, W, Dims) = base grid @ theta^T, and
// its gradient to theta.
// No FMA contraction in the sampling kernels: coordinates must round exactly
// as torch's do (a fused multiply-add moves huge coordinates by an ulp, and a
// reflected coordinate by a whole pixel).
#pragma GCC optimize("fp-contract=off")

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include "../sampling_checks.h"
#include "../sampler_shape.h"
#include "affine_coords.h"
#include "cpu_kernels.h"

namespace attnkernels {
namespace cpu {
namespace {

// Output sizes in axis order x, y, z.
void axis_sizes(at::IntArrayRef size, int64_t* out) {
  const int64_t dims = static_cast<int64_t>(size.size()) - 2;
  for (int64_t a = 0; a < dims; ++a) out[a] = size[size.size() - 1 - a];
}

}  // namespace

// The entry points (cpu_kernels.h).
at::Tensor affine_grid_cpu(const at::Tensor& theta, at::IntArrayRef size, bool align_corners) {
  check_affine_args(theta, size);
  at::Tensor grid = at::empty(grid_shape(size), theta.options());
  if (grid.numel() == 0) return grid;
  int64_t out_size[3] = {1, 1, 1};
  axis_sizes(size, out_size);
  const int64_t dims = static_cast<int64_t>(size.size()) - 2;
  const int64_t points = grid.numel() / (size[0] * dims);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, theta.scalar_type(), "affine_grid_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor theta_acc = theta.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    scalar_t* out = grid.mutable_data_ptr<scalar_t>();
    auto run = [&](auto dims_tag) {
      constexpr int D = decltype(dims_tag)::value;
      AffineCoords<acc_t, D> coords(theta_acc.const_data_ptr<acc_t>(), size[0], out_size, align_corners, 0);
      at::parallel_for(0, size[0] * points, 2048, [&](int64_t begin, int64_t end) {
        acc_t xyz[D];
        auto cursor = coords.cursor(begin);
        for (int64_t i = begin; i < end; ++i, cursor.advance()) {
          cursor.load(xyz);
          for (int a = 0; a < D; ++a) out[i * D + a] = static_cast<scalar_t>(xyz[a]);
        }
      });
    };
    dispatch_dims(dims, run);
  });
  return grid;
}

// grad_theta[n, r, a] = sum over positions p of grad_grid[n, p, r] * base[p, a].
at::Tensor affine_grid_backward_cpu(const at::Tensor& grad_grid, at::IntArrayRef size, bool align_corners) {
  TORCH_CHECK(size.size() == 4 || size.size() == 5,
              "attnkernels: expected `size` of length 4 or 5, got ", size);
  const int64_t dims = static_cast<int64_t>(size.size()) - 2;
  TORCH_CHECK(grad_grid.sizes() == at::IntArrayRef(grid_shape(size)), "attnkernels: `grad_grid` has sizes ",
              grad_grid.sizes(), ", expected ", at::IntArrayRef(grid_shape(size)));
  at::Tensor grad_theta = at::empty({size[0], dims, dims + 1}, grad_grid.options());
  int64_t out_size[3] = {1, 1, 1};
  axis_sizes(size, out_size);
  const int64_t points = size[0] == 0 ? 0 : grad_grid.numel() / (size[0] * dims);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_grid.scalar_type(), "affine_grid_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor g = grad_grid.contiguous();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    auto run = [&](auto dims_tag) {
      constexpr int D = decltype(dims_tag)::value;
      const int64_t total = size[0] * points;
      const int64_t slots = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), total / 4096));
      AffineCoords<acc_t, D> coords(nullptr, size[0], out_size, align_corners, slots);
      at::parallel_for(0, slots, 1, [&](int64_t first, int64_t last) {
        acc_t grad[D];
        for (int64_t s = first; s < last; ++s) {
          const int64_t begin = total * s / slots;
          auto cursor = coords.cursor(begin);
          for (int64_t i = begin; i < total * (s + 1) / slots; ++i, cursor.advance()) {
            for (int a = 0; a < D; ++a) grad[a] = static_cast<acc_t>(gp[i * D + a]);
            cursor.store_grad(s, grad);
          }
        }
      });
      coords.reduce_grad(slots, grad_theta.mutable_data_ptr<scalar_t>());
    };
    dispatch_dims(dims, run);
  });
  return grad_theta;
}

}  // namespace cpu
}  // namespace attnkernels
