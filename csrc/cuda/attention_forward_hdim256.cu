// Forward kernels for head dims up to 256 (one file per bucket: they compile in parallel).
#include "attention_forward.cuh"

namespace attnkernels {
namespace cuda_attention {

template void run_attention_forward<__half, 256>(const AttentionParams&, cudaStream_t);
template void run_attention_forward<__nv_bfloat16, 256>(const AttentionParams&, cudaStream_t);

}  // namespace cuda_attention
}  // namespace attnkernels
