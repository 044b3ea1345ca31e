// Backward kernels for head dims up to 64 (one file per bucket: they compile in parallel).
#include "attention_backward.cuh"

namespace attnkernels {
namespace cuda_attention {

template void run_attention_backward<__half, 64>(const AttentionParams&, bool, cudaStream_t);
template void run_attention_backward<__nv_bfloat16, 64>(const AttentionParams&, bool, cudaStream_t);
template void run_attention_backward_preprocess<__half>(const __half*, const __half*, const float*, float*, int64_t,
                                                        int, cudaStream_t);
template void run_attention_backward_preprocess<__nv_bfloat16>(const __nv_bfloat16*, const __nv_bfloat16*,
                                                               const float*, float*, int64_t, int, cudaStream_t);

}  // namespace cuda_attention
}  // namespace attnkernels
