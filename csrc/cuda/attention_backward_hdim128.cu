// Backward kernels for head dims up to 128 (one file per bucket: they compile in parallel).
#include "attention_backward.cuh"
#include "attention_kernels.h"

ATTNKERNELS_ATTENTION_BACKWARD_INSTANCES(128)
