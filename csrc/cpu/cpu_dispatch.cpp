// Runtime choice of the CPU variant of the hot kernels (grid_sample,
// affine_grid_sample, attention) and their registration with torch.
//
// setup.py compiles the kernel files once per variant (see ../cpu_isa.h):
// `default` (plain x86-64, or whatever the target is elsewhere), and on x86-64
// `avx2` (AVX2 + FMA + F16C) and `avx512` (AVX-512 F/BW/VL/DQ). This file is
// compiled with the plain flags only: it must run on every CPU, to find out
// which variant the CPU can run. The choice is made once, at the first call:
// the best variant the CPU supports, or a lower one named by the environment
// variable ATTNKERNELS_CPU_CAPABILITY (default, avx2, avx512).
#include <torch/library.h>

#include <cctype>
#include <cstdlib>
#include <string>

#include "cpu_kernels.h"

namespace attnkernels {
namespace cpu {

ATTNKERNELS_DECLARE_CPU_KERNELS(generic)
#if defined(ATTNKERNELS_CPU_VARIANTS)  // set by setup.py when it builds the avx2 and avx512 objects
ATTNKERNELS_DECLARE_CPU_KERNELS(avx2)
ATTNKERNELS_DECLARE_CPU_KERNELS(avx512)
#endif

namespace {

enum class Capability { Default = 0, Avx2 = 1, Avx512 = 2 };

const char* name_of(Capability capability) {
  switch (capability) {
    case Capability::Avx512: return "avx512";
    case Capability::Avx2: return "avx2";
    default: return "default";
  }
}

// The highest variant that this build has and this CPU (and OS) can run.
Capability best_supported() {
#if defined(ATTNKERNELS_CPU_VARIANTS) && defined(__x86_64__)
  // libgcc's cpu model also checks that the OS saves the AVX / AVX-512 registers.
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (avx2 && avx512) return Capability::Avx512;
  if (avx2) return Capability::Avx2;
#endif
  return Capability::Default;
}

struct Selection {
  Capability capability = Capability::Default;
  std::string note;  // why the requested variant is not the one in use; empty when it is
  CpuKernels kernels;
};

Selection select() {
  Selection chosen;
  const Capability best = best_supported();
  chosen.capability = best;
  const char* requested = std::getenv("ATTNKERNELS_CPU_CAPABILITY");
  if (requested != nullptr && *requested != '\0') {
    std::string name(requested);
    for (char& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    const std::string use = std::string("; using the best available variant, '") + name_of(best) + "'.";
    if (name == "default" || name == "avx2" || name == "avx512") {
      const Capability wanted =
          name == "avx512" ? Capability::Avx512 : name == "avx2" ? Capability::Avx2 : Capability::Default;
      if (wanted <= best) {
        chosen.capability = wanted;
      } else {
#if defined(ATTNKERNELS_CPU_VARIANTS)
        const char* why = wanted == Capability::Avx512 ? "this CPU lacks AVX-512 (F, BW, VL and DQ)"
                                                       : "this CPU lacks AVX2, FMA or F16C";
#else
        const char* why = "this build of attnkernels has only the default CPU variant (it was not built for x86-64)";
#endif
        chosen.note = "attnkernels: ATTNKERNELS_CPU_CAPABILITY=" + std::string(requested) + " cannot be used: " +
                      why + use;
      }
    } else {
      chosen.note = "attnkernels: ATTNKERNELS_CPU_CAPABILITY=" + std::string(requested) +
                    " is not one of 'default', 'avx2', 'avx512'" + use;
    }
  }
  switch (chosen.capability) {
#if defined(ATTNKERNELS_CPU_VARIANTS)
    case Capability::Avx512:
      avx512::add_grid_sample_kernels(chosen.kernels);
      avx512::add_affine_grid_sample_kernels(chosen.kernels);
      avx512::add_attention_kernels(chosen.kernels);
      break;
    case Capability::Avx2:
      avx2::add_grid_sample_kernels(chosen.kernels);
      avx2::add_affine_grid_sample_kernels(chosen.kernels);
      avx2::add_attention_kernels(chosen.kernels);
      break;
#endif
    default:
      generic::add_grid_sample_kernels(chosen.kernels);
      generic::add_affine_grid_sample_kernels(chosen.kernels);
      generic::add_attention_kernels(chosen.kernels);
  }
  return chosen;
}

const Selection& selection() {
  static const Selection chosen = select();
  return chosen;
}

const CpuKernels& kernels() { return selection().kernels; }

at::Tensor grid_sample(const at::Tensor& input, const at::Tensor& grid, int64_t interpolation, int64_t padding,
                       bool align_corners) {
  return kernels().grid_sample(input, grid, interpolation, padding, align_corners);
}

std::tuple<at::Tensor, at::Tensor> grid_sample_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                                        const at::Tensor& grid, int64_t interpolation,
                                                        int64_t padding, bool align_corners,
                                                        std::array<bool, 2> output_mask) {
  return kernels().grid_sample_backward(grad_output, input, grid, interpolation, padding, align_corners,
                                        output_mask);
}

at::Tensor affine_grid_sample(const at::Tensor& input, const at::Tensor& theta, at::IntArrayRef size,
                              int64_t interpolation, int64_t padding, bool align_corners) {
  return kernels().affine_grid_sample(input, theta, size, interpolation, padding, align_corners);
}

std::tuple<at::Tensor, at::Tensor> affine_grid_sample_backward(const at::Tensor& grad_output,
                                                               const at::Tensor& input, const at::Tensor& theta,
                                                               at::IntArrayRef size, int64_t interpolation,
                                                               int64_t padding, bool align_corners,
                                                               std::array<bool, 2> output_mask) {
  return kernels().affine_grid_sample_backward(grad_output, input, theta, size, interpolation, padding,
                                               align_corners, output_mask);
}

std::tuple<at::Tensor, at::Tensor> attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                             const std::optional<at::Tensor>& attn_mask, double dropout_p,
                                             bool is_causal, double scale,
                                             const std::optional<at::Tensor>& dropout_seed) {
  return kernels().attention(query, key, value, attn_mask, dropout_p, is_causal, scale, dropout_seed);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& query,
    const at::Tensor& key, const at::Tensor& value, const std::optional<at::Tensor>& attn_mask, const at::Tensor& out,
    const at::Tensor& lse, double dropout_p, bool is_causal, double scale,
    const std::optional<at::Tensor>& dropout_seed, std::array<bool, 4> output_mask) {
  return kernels().attention_backward(grad_out, grad_lse, query, key, value, attn_mask, out, lse, dropout_p,
                                      is_causal, scale, dropout_seed, output_mask);
}

}  // namespace

// For attnkernels.cpu_capability() (csrc/ops.cpp).
const char* cpu_capability_name() { return name_of(selection().capability); }
const char* cpu_capability_note() { return selection().note.c_str(); }

TORCH_LIBRARY_IMPL(attnkernels, CPU, m) {
  m.impl("grid_sample", &grid_sample);
  m.impl("grid_sample_backward", &grid_sample_backward);
  m.impl("affine_grid_sample", &affine_grid_sample);
  m.impl("affine_grid_sample_backward", &affine_grid_sample_backward);
  m.impl("attention", &attention);
  m.impl("attention_backward", &attention_backward);
}

}  // namespace cpu
}  // namespace attnkernels
