// The sampling launchers for c10::Half, forward (see sampler_instances.cuh).
#include "sampler_instances.cuh"

namespace attnkernels {
namespace cuda {
ATTNKERNELS_SAMPLER_EVERY_MODE(ATTNKERNELS_SAMPLER_FORWARD, c10::Half)
}  // namespace cuda
}  // namespace attnkernels
