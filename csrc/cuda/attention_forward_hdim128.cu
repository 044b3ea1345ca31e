// Forward kernels for head dims up to 128 (one file per bucket: they compile in parallel).
#include "attention_forward.cuh"
#include "attention_kernels.h"

ATTNKERNELS_ATTENTION_FORWARD_INSTANCES(128)
