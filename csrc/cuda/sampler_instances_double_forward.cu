// The sampling launchers for double, forward (see sampler_instances.cuh).
#include "sampler_instances.cuh"

namespace attnkernels {
namespace cuda {
ATTNKERNELS_SAMPLER_EVERY_MODE(ATTNKERNELS_SAMPLER_FORWARD, double)
}  // namespace cuda
}  // namespace attnkernels
