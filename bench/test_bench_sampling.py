"""pytest-benchmark: grid_sample (2-D, 3-D) and the fused affine_grid_sample, forward and
forward + backward, every backend and torch (cases from attnkernels.bench.cases)."""

OP_PREFIXES = ("grid_sample", "affine_grid_sample")


def test_sampling(run_benchmark, prepared, backend):
    run_benchmark(prepared, backend)
