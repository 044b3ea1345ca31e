// The torch-facing CPU kernels of one CPU variant (see ../cpu_isa.h), as a
// table that csrc/cpu/cpu_dispatch.cpp fills from the variant chosen at run
// time. Plain function pointers: this type has no inline code, so it is the
// same in every variant's translation unit.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <optional>
#include <tuple>

namespace attnkernels {
namespace cpu {

struct CpuKernels {
  at::Tensor (*grid_sample)(const at::Tensor& input, const at::Tensor& grid, int64_t interpolation, int64_t padding,
                            bool align_corners) = nullptr;
  std::tuple<at::Tensor, at::Tensor> (*grid_sample_backward)(const at::Tensor& grad_output, const at::Tensor& input,
                                                             const at::Tensor& grid, int64_t interpolation,
                                                             int64_t padding, bool align_corners,
                                                             std::array<bool, 2> output_mask) = nullptr;
  at::Tensor (*affine_grid_sample)(const at::Tensor& input, const at::Tensor& theta, at::IntArrayRef size,
                                   int64_t interpolation, int64_t padding, bool align_corners) = nullptr;
  std::tuple<at::Tensor, at::Tensor> (*affine_grid_sample_backward)(
      const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& theta, at::IntArrayRef size,
      int64_t interpolation, int64_t padding, bool align_corners, std::array<bool, 2> output_mask) = nullptr;
  std::tuple<at::Tensor, at::Tensor> (*attention)(const at::Tensor& query, const at::Tensor& key,
                                                  const at::Tensor& value, const std::optional<at::Tensor>& attn_mask,
                                                  double dropout_p, bool is_causal, double scale,
                                                  const std::optional<at::Tensor>& dropout_seed) = nullptr;
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> (*attention_backward)(
      const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& query,
      const at::Tensor& key, const at::Tensor& value, const std::optional<at::Tensor>& attn_mask,
      const at::Tensor& out, const at::Tensor& lse, double dropout_p, bool is_causal, double scale,
      const std::optional<at::Tensor>& dropout_seed, std::array<bool, 4> output_mask) = nullptr;
};

// Each kernel file defines these in its variant's namespace
// (attnkernels::cpu::generic / avx2 / avx512).
#define ATTNKERNELS_DECLARE_CPU_KERNELS(isa)     \
  namespace isa {                                \
  void add_grid_sample_kernels(CpuKernels&);     \
  void add_affine_grid_sample_kernels(CpuKernels&); \
  void add_attention_kernels(CpuKernels&);       \
  }

}  // namespace cpu
}  // namespace attnkernels
