// The sampling launchers for float, forward (see sampler_instances.cuh).
#include "sampler_instances.cuh"

namespace attnkernels {
namespace cuda {
ATTNKERNELS_SAMPLER_EVERY_MODE(ATTNKERNELS_SAMPLER_FORWARD, float)
}  // namespace cuda
}  // namespace attnkernels
