"""pytest-benchmark suites over the same cases as ``python -m attnkernels.bench``.

    pytest bench/ --benchmark-only                  # default sizes for the device
    pytest bench/ --benchmark-only --bench-quick    # one small size per op
    pytest bench/ --benchmark-only --bench-sizes 128,256 --bench-dtype bfloat16

Each test is one (case, backend): the backend is checked against torch first
(a wrong result fails the test and is not timed), then timed by pytest-benchmark
on inputs rotated among several copies. ``torch`` is benchmarked as its own backend.
"""

from __future__ import annotations

import gc

import pytest
import torch

from attnkernels.bench import cases, timing

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def pytest_addoption(parser):
    group = parser.getgroup("attnkernels benchmarks")
    group.addoption("--bench-quick", action="store_true", help="one small size per op")
    group.addoption("--bench-sizes", default=None, help="comma-separated sizes (image side or sequence length)")
    group.addoption("--bench-dtype", default=None, help="comma-separated dtypes (default: per device)")


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_generate_tests(metafunc):
    if "bench_case" not in metafunc.fixturenames:
        return
    config, device = metafunc.config, _device()
    prefixes = tuple(metafunc.module.OP_PREFIXES)
    ops = [op for op in cases.available_ops() if op.startswith(prefixes)]
    sizes = config.getoption("--bench-sizes")
    dtypes = config.getoption("--bench-dtype")
    selected = cases.build_cases(
        ops, device,
        [_DTYPES[name] for name in dtypes.split(",")] if dtypes else cases.default_dtypes(device.type),
        [int(s) for s in sizes.split(",")] if sizes else None,
        quick=config.getoption("--bench-quick"),
    )
    # Case outermost, so one case's inputs serve all its backends before the next is built.
    metafunc.parametrize("bench_case", selected, ids=[case.id for case in selected])
    metafunc.parametrize("backend", ["torch", *cases.default_backends(device)])


_prepared: dict[cases.Case, cases.PreparedCase] = {}


@pytest.fixture
def prepared(bench_case: cases.Case) -> cases.PreparedCase:
    """The case's inputs, built once for all its backends (only one case is kept alive)."""
    if bench_case not in _prepared:
        _prepared.clear()
        gc.collect()
        if bench_case.device.type == "cuda":
            torch.cuda.empty_cache()
        case = cases.PreparedCase(bench_case, copies=1)
        case.extend_to(timing.input_copies(case.input_bytes(), bench_case.device))
        _prepared[bench_case] = case
    return _prepared[bench_case]


@pytest.fixture
def run_benchmark(benchmark):
    """run_benchmark(prepared, backend): check against torch, then time with pytest-benchmark."""

    def run(prepared: cases.PreparedCase, backend: str) -> None:
        case = prepared.case
        try:
            if backend == "torch":
                prepared.expected()
            else:
                check = prepared.check(backend)
                if not check.ok:
                    pytest.fail(f"WRONG (not timed): {backend} on {case.id}: {check.detail}")
        except cases.Unsupported as reason:
            pytest.skip(f"unsupported: {reason}")
        call = prepared.timed_callable(backend)
        if case.device.type == "cuda":
            def timed():
                call()
                torch.cuda.synchronize()
        else:
            timed = call
        benchmark.group = f"{case.op} {case.direction} {case.dtype_name} {case.label}"
        benchmark.extra_info.update(op=case.op, direction=case.direction, size=case.size, shape=case.label,
                                    dtype=case.dtype_name, backend=backend, work=case.work,
                                    work_unit=case.spec.work_unit, input_copies=prepared.copies)
        benchmark(timed)

    return run
