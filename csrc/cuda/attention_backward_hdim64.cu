// Backward kernels for head dims up to 64 (one file per bucket: they compile in parallel).
#include "attention_backward.cuh"
#include "attention_kernels.h"

ATTNKERNELS_ATTENTION_BACKWARD_INSTANCES(64)

namespace attnkernels {
namespace cuda_attention {

// The dtype-only preprocessing kernel, instantiated once (here).
template void run_attention_backward_preprocess<__half>(const __half*, const __half*, const float*, float*, int64_t,
                                                        int, cudaStream_t);
template void run_attention_backward_preprocess<__nv_bfloat16>(const __nv_bfloat16*, const __nv_bfloat16*,
                                                               const float*, float*, int64_t, int, cudaStream_t);

}  // namespace cuda_attention
}  // namespace attnkernels
