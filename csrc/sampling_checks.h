// Argument checks shared by every C++ backend of the sampling ops, so that a
// direct call to torch.ops.attnkernels.* fails with the same clear message as
// the Python API.
#pragma once

#include "cpu_isa.h"
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace attnkernels {
inline namespace ATTNKERNELS_CPU_ISA {  // see cpu_isa.h

inline void check_sampling_modes(int64_t interpolation, int64_t padding) {
  TORCH_CHECK(interpolation >= 0 && interpolation <= 2,
              "attnkernels: `mode` must be 0 (bilinear), 1 (nearest) or 2 (bicubic), got ", interpolation);
  TORCH_CHECK(padding >= 0 && padding <= 2,
              "attnkernels: `padding_mode` must be 0 (zeros), 1 (border) or 2 (reflection), got ", padding);
}

inline void check_sampled_input(const at::Tensor& input) {
  TORCH_CHECK(input.dim() == 4 || input.dim() == 5,
              "attnkernels: expected `input` of shape (N, C, H, W) or (N, C, D, H, W), got sizes ", input.sizes());
  TORCH_CHECK(at::isFloatingType(input.scalar_type()),
              "attnkernels: expected `input` to be a floating point tensor, got ", input.scalar_type());
  for (int64_t d = 2; d < input.dim(); ++d) {
    TORCH_CHECK(input.size(d) > 0, "attnkernels: expected `input` to have non-empty spatial dimensions, got sizes ",
                input.sizes());
  }
}

inline void check_grid_sample_args(const at::Tensor& input, const at::Tensor& grid, int64_t interpolation,
                                   int64_t padding) {
  check_sampling_modes(interpolation, padding);
  check_sampled_input(input);
  TORCH_CHECK(grid.dim() == input.dim(), "attnkernels: expected `grid` to have as many dimensions as `input` (",
              input.dim(), "), got `grid` with sizes ", grid.sizes());
  TORCH_CHECK(grid.size(-1) == input.dim() - 2, "attnkernels: expected `grid` to have size ", input.dim() - 2,
              " in its last dimension, got sizes ", grid.sizes());
  TORCH_CHECK(grid.size(0) == input.size(0), "attnkernels: expected `grid` and `input` to have the same batch size, got ",
              grid.size(0), " and ", input.size(0));
  TORCH_CHECK(grid.scalar_type() == input.scalar_type(), "attnkernels: expected `grid` to have the dtype of `input` (",
              input.scalar_type(), "), got ", grid.scalar_type());
  TORCH_CHECK(grid.device() == input.device(), "attnkernels: expected `grid` on the device of `input` (",
              input.device(), "), got ", grid.device());
}

inline void check_grad_output(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& grid) {
  TORCH_CHECK(grad_output.dim() == input.dim() && grad_output.size(0) == input.size(0) &&
                  grad_output.size(1) == input.size(1),
              "attnkernels: `grad_output` has sizes ", grad_output.sizes(), ", which do not match the output");
  for (int64_t d = 2; d < input.dim(); ++d) {
    TORCH_CHECK(grad_output.size(d) == grid.size(d - 1), "attnkernels: `grad_output` has sizes ", grad_output.sizes(),
                ", which do not match the output");
  }
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(),
              "attnkernels: expected `grad_output` to have the dtype of `input`");
}

// theta (N, 2, 3) for size (N, C, H, W); (N, 3, 4) for size (N, C, D, H, W).
inline void check_affine_args(const at::Tensor& theta, at::IntArrayRef size) {
  TORCH_CHECK(size.size() == 4 || size.size() == 5,
              "attnkernels: expected `size` of length 4 (N, C, H, W) or 5 (N, C, D, H, W), got ", size);
  const int64_t dims = static_cast<int64_t>(size.size()) - 2;
  TORCH_CHECK(at::isFloatingType(theta.scalar_type()),
              "attnkernels: expected `theta` to be a floating point tensor, got ", theta.scalar_type());
  TORCH_CHECK(theta.dim() == 3 && theta.size(1) == dims && theta.size(2) == dims + 1,
              "attnkernels: expected `theta` of shape (N, ", dims, ", ", dims + 1, ") for a size of length ",
              size.size(), ", got ", theta.sizes());
  TORCH_CHECK(theta.size(0) == size[0], "attnkernels: expected `theta` to have batch size size[0] = ", size[0],
              ", got ", theta.size(0));
  for (int64_t d = 2; d < static_cast<int64_t>(size.size()); ++d) {
    TORCH_CHECK(size[d] > 0, "attnkernels: expected positive spatial sizes in `size`, got ", size);
  }
}

// affine_grid_sample: input (N, C, [D,] H, W), theta (N, dims, dims + 1), size the output
// (N, C, [Do,] Ho, Wo) with the batch and channels of the input.
inline void check_affine_grid_sample_args(const at::Tensor& input, const at::Tensor& theta, at::IntArrayRef size,
                                          int64_t interpolation, int64_t padding) {
  check_sampling_modes(interpolation, padding);
  check_sampled_input(input);
  check_affine_args(theta, size);
  TORCH_CHECK(static_cast<int64_t>(size.size()) == input.dim(), "attnkernels: expected `size` of length ",
              input.dim(), " to match `input`, got ", size);
  TORCH_CHECK(size[0] == input.size(0) && size[1] == input.size(1),
              "attnkernels: expected `size` to start with the batch and channels of `input` (", input.size(0), ", ",
              input.size(1), "), got ", size);
  TORCH_CHECK(theta.scalar_type() == input.scalar_type(), "attnkernels: expected `theta` to have the dtype of `input` (",
              input.scalar_type(), "), got ", theta.scalar_type());
  TORCH_CHECK(theta.device() == input.device(), "attnkernels: expected `theta` on the device of `input` (",
              input.device(), "), got ", theta.device());
}

inline void check_affine_grid_sample_grad_output(const at::Tensor& grad_output, const at::Tensor& input,
                                                 at::IntArrayRef size) {
  TORCH_CHECK(grad_output.sizes() == size, "attnkernels: `grad_output` has sizes ", grad_output.sizes(),
              ", expected the output size ", size);
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(),
              "attnkernels: expected `grad_output` to have the dtype of `input`");
  TORCH_CHECK(grad_output.device() == input.device(), "attnkernels: expected `grad_output` on the device of `input` (",
              input.device(), "), got ", grad_output.device());
}

}  // namespace ATTNKERNELS_CPU_ISA
}  // namespace attnkernels
