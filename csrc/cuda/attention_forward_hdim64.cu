// Forward kernels for head dims up to 64 (one file per bucket: they compile in parallel).
#include "attention_forward.cuh"

namespace attnkernels {
namespace cuda_attention {

template void run_attention_forward<__half, 64>(const AttentionParams&, cudaStream_t);
template void run_attention_forward<__nv_bfloat16, 64>(const AttentionParams&, cudaStream_t);

}  // namespace cuda_attention
}  // namespace attnkernels
