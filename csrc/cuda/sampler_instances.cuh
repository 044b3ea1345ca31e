// Explicit instantiations of the sampling kernel launchers, for one dtype and one direction per
// unit (sampler_instances_<dtype>_<direction>.cu): every (dims, mode) pair, for a stored grid
// (grid_sample) and for theta (the fused affine_grid_sample). The op files only declare the
// launchers, so a build compiles these units as parallel jobs instead of two large ones.
#pragma once

#include <ATen/OpMathType.h>

#include "sampler_launch_impl.cuh"

namespace attnkernels {
namespace cuda {

// The two coordinate sources of scalar type S: a stored grid, and theta.
template <typename S, int D>
using StoredGrid = GridSource<S, at::opmath_type<S>, D>;
template <typename S, int D>
using Theta = AffineSource<at::opmath_type<S>, D>;

}  // namespace cuda
}  // namespace attnkernels

// One (scalar type, dims, mode): the forward launcher for both coordinate sources.
#define ATTNKERNELS_SAMPLER_FORWARD(S, D, M)                                                                 \
  template void launch_forward<S, at::opmath_type<S>, D, M, StoredGrid<S, D>>(                              \
      const SamplerShape&, const at::Tensor&, const StoredGrid<S, D>&, at::Tensor&);                     \
  template void launch_forward<S, at::opmath_type<S>, D, M, Theta<S, D>>(                                   \
      const SamplerShape&, const at::Tensor&, const Theta<S, D>&, at::Tensor&);

// One (scalar type, dims, mode): the atomic and the deterministic backward for both sources.
#define ATTNKERNELS_SAMPLER_BACKWARD(S, D, M)                                                                   \
  template void launch_backward<S, at::opmath_type<S>, D, M, StoredGrid<S, D>>(                                \
      const SamplerShape&, const at::Tensor&, const StoredGrid<S, D>&, const at::Tensor&, at::opmath_type<S>*, \
      bool);                                                                                                    \
  template void launch_backward<S, at::opmath_type<S>, D, M, Theta<S, D>>(                                     \
      const SamplerShape&, const at::Tensor&, const Theta<S, D>&, const at::Tensor&, at::opmath_type<S>*, bool); \
  template void deterministic_input_grad<S, at::opmath_type<S>, D, M, StoredGrid<S, D>>(                       \
      const SamplerShape&, const StoredGrid<S, D>&, const at::Tensor&, at::Tensor&);                        \
  template void deterministic_input_grad<S, at::opmath_type<S>, D, M, Theta<S, D>>(                            \
      const SamplerShape&, const Theta<S, D>&, const at::Tensor&, at::Tensor&);

// Every (dims, mode) pair of one direction for scalar type S.
#define ATTNKERNELS_SAMPLER_EVERY_MODE(DIRECTION, S)          \
  DIRECTION(S, 2, Interpolation::Bilinear)                    \
  DIRECTION(S, 2, Interpolation::Nearest)                     \
  DIRECTION(S, 2, Interpolation::Bicubic)                     \
  DIRECTION(S, 3, Interpolation::Bilinear)                    \
  DIRECTION(S, 3, Interpolation::Nearest)                     \
  DIRECTION(S, 3, Interpolation::Bicubic)
