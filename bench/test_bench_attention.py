"""pytest-benchmark: attention, causal and not, forward and forward + backward, every backend
and torch (cases from attnkernels.bench.cases; none while attnkernels has no attention)."""

OP_PREFIXES = ("attention",)


def test_attention(run_benchmark, prepared, backend):
    run_benchmark(prepared, backend)
