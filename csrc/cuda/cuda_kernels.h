// The CUDA kernels' entry points, defined in csrc/cuda/<op>_kernel.cu and
// attention_api.cu and registered with torch by csrc/cuda/cuda_registration.cu,
// the one place that registers CUDA kernels.
#pragma once

#include "../kernel_signatures.h"

namespace attnkernels {
namespace cuda {

GridSampleKernel grid_sample_cuda;
GridSampleBackwardKernel grid_sample_backward_cuda;
AffineGridKernel affine_grid_cuda;
AffineGridBackwardKernel affine_grid_backward_cuda;
AffineGridSampleKernel affine_grid_sample_cuda;
AffineGridSampleBackwardKernel affine_grid_sample_backward_cuda;

}  // namespace cuda

namespace cuda_attention {

AttentionKernel attention_cuda;
AttentionBackwardKernel attention_backward_cuda;

}  // namespace cuda_attention
}  // namespace attnkernels
