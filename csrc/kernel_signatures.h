// The C++ signature of every op's kernel, written once: the CPU and CUDA
// backends declare their entry points with these function types
// (csrc/cpu/cpu_kernels.h, csrc/cuda/cuda_kernels.h), so a kernel whose
// parameters drift from its schema in csrc/ops.cpp fails to compile or link
// instead of registering a mismatch.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

namespace attnkernels {

// Which of the sampling forwards' CPU-dependent paths this variant takes (measuring them if it has not yet).
using SamplingPathsKernel = std::string();
using GridSampleKernel = at::Tensor(const at::Tensor& input, const at::Tensor& grid, int64_t interpolation,
                                    int64_t padding, bool align_corners);
using GridSampleBackwardKernel = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& grid, int64_t interpolation,
    int64_t padding, bool align_corners, std::array<bool, 2> output_mask);

using AffineGridKernel = at::Tensor(const at::Tensor& theta, at::IntArrayRef size, bool align_corners);
using AffineGridBackwardKernel = at::Tensor(const at::Tensor& grad_grid, at::IntArrayRef size, bool align_corners);

using AffineGridSampleKernel = at::Tensor(const at::Tensor& input, const at::Tensor& theta, at::IntArrayRef size,
                                          int64_t interpolation, int64_t padding, bool align_corners);
using AffineGridSampleBackwardKernel = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& theta, at::IntArrayRef size,
    int64_t interpolation, int64_t padding, bool align_corners, std::array<bool, 2> output_mask);

using AttentionKernel = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const std::optional<at::Tensor>& attn_mask,
    double dropout_p, bool is_causal, double scale, const std::optional<at::Tensor>& dropout_seed);
using AttentionBackwardKernel = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& query,
    const at::Tensor& key, const at::Tensor& value, const std::optional<at::Tensor>& attn_mask, const at::Tensor& out,
    const at::Tensor& lse, double dropout_p, bool is_causal, double scale,
    const std::optional<at::Tensor>& dropout_seed, std::array<bool, 4> output_mask);

}  // namespace attnkernels
