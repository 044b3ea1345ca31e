// Every CUDA kernel of the library is registered here (the one
// TORCH_LIBRARY_IMPL for CUDA); the schemas are in csrc/ops.cpp.
#include <torch/library.h>

#include "cuda_kernels.h"

namespace attnkernels {

TORCH_LIBRARY_IMPL(attnkernels, CUDA, m) {
  m.impl("grid_sample", &cuda::grid_sample_cuda);
  m.impl("grid_sample_backward", &cuda::grid_sample_backward_cuda);
  m.impl("affine_grid", &cuda::affine_grid_cuda);
  m.impl("affine_grid_backward", &cuda::affine_grid_backward_cuda);
  m.impl("affine_grid_sample", &cuda::affine_grid_sample_cuda);
  m.impl("affine_grid_sample_backward", &cuda::affine_grid_sample_backward_cuda);
  m.impl("attention", &cuda_attention::attention_cuda);
  m.impl("attention_backward", &cuda_attention::attention_backward_cuda);
}

}  // namespace attnkernels
