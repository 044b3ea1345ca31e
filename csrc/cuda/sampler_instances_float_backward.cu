// The sampling launchers for float, backward (see sampler_instances.cuh).
#include "sampler_instances.cuh"

namespace attnkernels {
namespace cuda {
ATTNKERNELS_SAMPLER_EVERY_MODE(ATTNKERNELS_SAMPLER_BACKWARD, float)
}  // namespace cuda
}  // namespace attnkernels
