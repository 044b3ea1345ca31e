// Backward kernels for head dims up to 256: two passes of 128 columns (one file per bucket: parallel compiles).
#include "attention_backward.cuh"

namespace attnkernels {
namespace cuda_attention {

template void run_attention_backward<__half, 256>(const AttentionParams&, bool, cudaStream_t);
template void run_attention_backward<__nv_bfloat16, 256>(const AttentionParams&, bool, cudaStream_t);

}  // namespace cuda_attention
}  // namespace attnkernels
