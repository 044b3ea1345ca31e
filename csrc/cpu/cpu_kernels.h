// The CPU kernels' entry points. The hot ones (grid_sample, affine_grid_sample,
// attention) are compiled once per CPU variant (see ../cpu_isa.h), each copy in
// its variant's namespace (attnkernels::cpu::generic / avx2 / avx512), and
// csrc/cpu/cpu_dispatch.cpp gathers one variant's into a CpuKernels table,
// chosen at run time; affine_grid is compiled once. cpu_dispatch.cpp is the one
// place that registers CPU kernels with torch.
#pragma once

#include "../kernel_signatures.h"

namespace attnkernels {
namespace cpu {

// A choice between two code paths that give the same bits and whose speed depends on the CPU:
// measured once per process, or forced by an environment variable set to "on" or "off" ("auto" or
// unset: measured). Read at every kernel call (tests, tuning), once per call. Defined in
// cpu_dispatch.cpp, compiled once for every CPU: its error message's inline helpers must not be
// instantiated in a variant's translation unit, where the linker could keep an AVX copy for all.
enum class PathChoice { Measure, On, Off };
PathChoice path_choice_from_environment(const char* variable);

// One variant's hot kernels. Plain function pointers: this type has no inline
// code, so it is the same in every variant's translation unit.
struct CpuKernels {
  GridSampleKernel* grid_sample = nullptr;
  GridSampleBackwardKernel* grid_sample_backward = nullptr;
  AffineGridSampleKernel* affine_grid_sample = nullptr;
  AffineGridSampleBackwardKernel* affine_grid_sample_backward = nullptr;
  AttentionKernel* attention = nullptr;
  AttentionBackwardKernel* attention_backward = nullptr;
  SamplingPathsKernel* sampling_paths = nullptr;
};

// The entry points each kernel file defines in the variant namespace `isa`.
#define ATTNKERNELS_DECLARE_CPU_KERNELS(isa)                \
  namespace isa {                                           \
  GridSampleKernel grid_sample_cpu;                         \
  GridSampleBackwardKernel grid_sample_backward_cpu;        \
  AffineGridSampleKernel affine_grid_sample_cpu;            \
  AffineGridSampleBackwardKernel affine_grid_sample_backward_cpu; \
  AttentionKernel attention_cpu;                            \
  AttentionBackwardKernel attention_backward_cpu;           \
  SamplingPathsKernel sampling_paths_cpu;                   \
  }

// The table of the variant `isa`.
#define ATTNKERNELS_CPU_KERNELS_OF(isa)                                                                    \
  CpuKernels {                                                                                             \
    &isa::grid_sample_cpu, &isa::grid_sample_backward_cpu, &isa::affine_grid_sample_cpu,                   \
        &isa::affine_grid_sample_backward_cpu, &isa::attention_cpu, &isa::attention_backward_cpu,          \
        &isa::sampling_paths_cpu                                                                           \
  }

// Whether the avx512 variant may use the AVX512-BF16 dot products (csrc/cpu/dot_tiles.h): the
// CPU has them and the chosen capability is avx512_bf16 or avx512_amx. Defined in cpu_dispatch.cpp.
bool bf16_dot_products_enabled();

// Whether the avx512 variant may use the AMX tiles (csrc/cpu/amx_tiles.h): the CPU has AMX-BF16, the
// OS gave the process the tile state, and the chosen capability is avx512_amx.
bool amx_tiles_enabled();

// csrc/cpu/affine_grid_kernel.cpp (one build for every variant: it is not hot).
AffineGridKernel affine_grid_cpu;
AffineGridBackwardKernel affine_grid_backward_cpu;

}  // namespace cpu
}  // namespace attnkernels
