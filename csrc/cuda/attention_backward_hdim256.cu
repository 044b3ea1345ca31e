// Backward kernels for head dims up to 256: two passes of 128 columns (one file per bucket: parallel compiles).
#include "attention_backward.cuh"
#include "attention_kernels.h"

ATTNKERNELS_ATTENTION_BACKWARD_INSTANCES(256)
