// The shape of one CPU sampling problem, shared by the sampler headers.
#pragma once

#include "../cpu_isa.h"
#include <cstdint>

#include "../grid_sample_math.h"

namespace attnkernels {
namespace cpu {
inline namespace ATTNKERNELS_CPU_ISA {  // see cpu_isa.h

using sampling::Interpolation;
using sampling::NanPolicy;
using sampling::Padding;

// Channels per block of the sampling loops (sampler_core.h), one vector value each. 16 fp32 are one
// AVX-512 register; the AVX2 variant uses 8 (one AVX2 register): a 16-lane GCC vector there lived on
// the stack between taps, and that build ran slower than the default one.
#if defined(ATTNKERNELS_CPU_AVX2)
constexpr int64_t kChannelBlock = 8;
#else
constexpr int64_t kChannelBlock = 16;
#endif

// Shapes of one sampling problem. Axis 0 is x (width), 1 is y, 2 is z.
struct SamplerShape {
  int64_t batch = 0;
  int64_t channels = 0;
  int64_t in_size[3] = {1, 1, 1};
  int64_t out_size[3] = {1, 1, 1};
  Padding padding = Padding::Zeros;
  bool align_corners = false;

  int64_t in_points() const { return in_size[0] * in_size[1] * in_size[2]; }
  int64_t out_points() const { return out_size[0] * out_size[1] * out_size[2]; }
};

}  // namespace ATTNKERNELS_CPU_ISA
}  // namespace cpu
}  // namespace attnkernels
