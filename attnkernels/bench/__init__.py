"""The benchmark command: every op on every available backend against torch's own op.

    python -m attnkernels.bench                  # default sizes for the device
    python -m attnkernels.bench --quick --out bench/out
    attnkernels-bench --op attention --dtype bfloat16 --sizes 1024,4096

``cases`` holds the one definition of the benchmark cases, shared with the
pytest-benchmark suites in ``bench/``.
"""

from .cli import main

__all__ = ["main"]
