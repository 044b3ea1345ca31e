"""The CPU sampling backward's extra memory does not grow with the thread count (issue 14, item 4).

Each run is a fresh process, so its peak resident memory (ru_maxrss) is that run's own.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from attnkernels import _extension

pytestmark = pytest.mark.skipif(not _extension.has_extension(), reason="the extension is not built")

# A 32 MiB fp32 volume (1 x 32 x 64^3) and a grid of as many points; the backward's private
# gradient copies are the only allocations that depend on the thread count.
_SCRIPT = """
import resource, sys, torch
import attnkernels
torch.set_num_threads(int(sys.argv[1]))
x = torch.randn(1, 32, 64, 64, 64, requires_grad=True)
g = torch.rand(1, 64, 64, 64, 3) * 2 - 1
out = attnkernels.grid_sample(x, g, align_corners=False, backend="cpu")
grad_out = torch.ones_like(out)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
torch.autograd.grad(out, x, grad_out)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024)
"""

_GRADIENT_BYTES = 32 * 64**3 * 4


def _backward_growth(threads: int) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run([sys.executable, "-c", _SCRIPT, str(threads)], capture_output=True, text=True, env=env,
                          timeout=600, check=True)
    return int(done.stdout.strip().splitlines()[-1])


def test_backward_memory_does_not_grow_with_threads():
    one, many = _backward_growth(1), _backward_growth(16)
    # One private copy per thread would add 15 gradients (480 MiB); the bound is 4 copies.
    assert many - one <= 3.5 * _GRADIENT_BYTES, (one / 2**20, many / 2**20)
