// The compiled CUDA attention kernels, one explicit instantiation per dtype and
// head-dim bucket in attention_{forward,backward}_hdim*.cu (compiled in
// parallel); attention_api.cu calls them through these declarations.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include "attention_launch.h"

namespace attnkernels {
namespace cuda_attention {

// T: __half or __nv_bfloat16; D: 64, 128 or 256.
template <typename T, int D>
void run_attention_forward(const AttentionParams& params, cudaStream_t stream);

// T: __half or __nv_bfloat16; D: 64 or 128. params.delta must be filled first
// (run_attention_backward_preprocess).
template <typename T, int D>
void run_attention_backward(const AttentionParams& params, bool deterministic, cudaStream_t stream);

// delta (B, Hq, L) = rowsum(dO * O) - grad_lse, for contiguous (rows, width) dO and O.
template <typename T>
void run_attention_backward_preprocess(const T* grad_out, const T* out, const float* grad_lse, float* delta,
                                       int64_t rows, int width, cudaStream_t stream);

}  // namespace cuda_attention
}  // namespace attnkernels

// The explicit instantiations of one head-dim bucket D, for both dtypes: the
// whole body of attention_forward_hdim<D>.cu / attention_backward_hdim<D>.cu.
#define ATTNKERNELS_ATTENTION_FORWARD_INSTANCES(D)                                                       \
  namespace attnkernels {                                                                               \
  namespace cuda_attention {                                                                            \
  template void run_attention_forward<__half, D>(const AttentionParams&, cudaStream_t);                 \
  template void run_attention_forward<__nv_bfloat16, D>(const AttentionParams&, cudaStream_t);          \
  }                                                                                                     \
  }
#define ATTNKERNELS_ATTENTION_BACKWARD_INSTANCES(D)                                                      \
  namespace attnkernels {                                                                               \
  namespace cuda_attention {                                                                            \
  template void run_attention_backward<__half, D>(const AttentionParams&, bool, cudaStream_t);          \
  template void run_attention_backward<__nv_bfloat16, D>(const AttentionParams&, bool, cudaStream_t);   \
  }                                                                                                     \
  }
