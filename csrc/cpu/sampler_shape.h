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

constexpr int64_t kChannelBlock = 16;  // one AVX-512 vector of fp32

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
