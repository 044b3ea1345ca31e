"""pytest-benchmark: attention, causal and not, and attention pooling (one query per head), forward and
forward + backward, every backend and torch (cases from attnkernels.bench.cases), and the peak memory of one
long head.

The peak-memory check runs one head with L=S=16384 (fp32, CPU) in a fresh process: the L x S
score matrix would take 1 GiB; the cpu kernel must stay far below.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import attnkernels

OP_PREFIXES = ("attention",)


def test_attention(run_benchmark, prepared, backend):
    run_benchmark(prepared, backend)


# Linux: writing 5 to /proc/self/clear_refs resets the peak resident size (VmHWM),
# so the import's own peak does not hide the call's.
_PEAK_MEMORY_SCRIPT = """
import json, sys, torch, torch.nn.functional as F, attnkernels
def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))
impl, backward = sys.argv[1], sys.argv[2] == "1"
L, E = 16384, 64
q, k, v = (torch.randn(1, 1, L, E, requires_grad=backward) for _ in range(3))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS")
if impl == "torch":
    out = F.scaled_dot_product_attention(q, k, v)
else:
    out = attnkernels.scaled_dot_product_attention(q, k, v, backend=impl)
if backward:
    out.sum().backward()
print(json.dumps({"peak_growth_mib": (status("VmHWM") - before) / 1024}))
"""


def peak_memory_growth_mib(implementation: str, backward: bool) -> float:
    """Growth of the peak resident memory over one call, in a fresh process (Linux)."""
    result = subprocess.run([sys.executable, "-c", _PEAK_MEMORY_SCRIPT, implementation, "1" if backward else "0"],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_growth_mib"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("implementation", ["torch", "cpu"])
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward_backward"])
def test_peak_memory_single_head_16384(benchmark, implementation, backward):
    """One head, L=S=16384, fp32: the score matrix alone would be 1024 MiB."""
    if implementation not in ("torch", *attnkernels.available_backends()):
        pytest.skip(f"the {implementation} backend is not available")
    growth = benchmark.pedantic(peak_memory_growth_mib, args=(implementation, backward), rounds=1, iterations=1)
    benchmark.extra_info["peak memory growth (MiB)"] = round(growth, 1)
    if implementation == "cpu":
        assert growth < 256, f"peak memory grew by {growth:.0f} MiB: something L x S was allocated"
