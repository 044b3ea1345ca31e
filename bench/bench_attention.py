"""CPU attention: the ``cpu`` backend against torch's SDPA, side by side in one process.

    pytest bench/bench_attention.py --benchmark-only         # pytest-benchmark table
    python bench/bench_attention.py --repeat 5               # interleaved runs, median ratios

fp32, B=4, H=8, L=S=1024, E=64: forward, causal forward, forward + backward.
GFLOP/s count forward 4·B·H·L·S·E (half of it when causal), backward 2.5x forward.
The peak-memory check runs one head with L=S=16384 in a fresh process: the
L x S score matrix would take 1 GiB; the kernels must stay far below.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import attnkernels

BATCH, HEADS, LENGTH, HEAD_DIM = 4, 8, 1024, 64
FORWARD_FLOP = 4 * BATCH * HEADS * LENGTH * LENGTH * HEAD_DIM
BACKWARD_FACTOR = 2.5

CASES = {  # name: (is_causal, with backward, FLOP)
    "forward": (False, False, FORWARD_FLOP),
    "causal_forward": (True, False, FORWARD_FLOP / 2),
    "forward_backward": (False, True, FORWARD_FLOP * (1 + BACKWARD_FACTOR)),
}


def make_inputs(requires_grad: bool):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(BATCH, HEADS, LENGTH, HEAD_DIM, generator=generator).requires_grad_(requires_grad)
               for _ in range(3))
    return q, k, v


def attention_fn(implementation: str):
    if implementation == "torch":
        return F.scaled_dot_product_attention
    return lambda q, k, v, is_causal: attnkernels.scaled_dot_product_attention(q, k, v, is_causal=is_causal,
                                                                                backend=implementation)


def make_step(implementation: str, case: str):
    """A no-argument callable running one measured step of `case`."""
    is_causal, backward, _ = CASES[case]
    q, k, v = make_inputs(backward)
    attention = attention_fn(implementation)
    if not backward:
        def step():
            with torch.no_grad():
                return attention(q, k, v, is_causal=is_causal)
        return step
    grad_out = torch.randn(BATCH, HEADS, LENGTH, HEAD_DIM, generator=torch.Generator().manual_seed(1))

    def step():
        out = attention(q, k, v, is_causal=is_causal)
        return torch.autograd.grad(out, (q, k, v), grad_out)

    return step


def sgemm_rate() -> float:
    """GFLOP/s of a 2048^3 fp32 matmul: this machine's BLAS ceiling."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(3))
    return 2 * 2048**3 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ----------------------------------------------------------------------------- pytest-benchmark


@pytest.mark.parametrize("implementation", ["torch", "cpu"])
@pytest.mark.parametrize("case", list(CASES))
def test_attention_cpu_fp32(benchmark, case, implementation):
    if implementation not in ("torch", *attnkernels.available_backends()):
        pytest.skip(f"the {implementation} backend is not available")
    step = make_step(implementation, case)
    benchmark.group = f"attention {case} fp32 B={BATCH} H={HEADS} L=S={LENGTH} E={HEAD_DIM}"
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    flop = CASES[case][2]
    benchmark.extra_info["GFLOP/s (median)"] = round(flop / benchmark.stats.stats.median / 1e9, 1)


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


# ----------------------------------------------------------------------------- interleaved comparison


def compare(repeat: int, rounds: int) -> dict:
    """Runs torch and cpu alternately, `repeat` times per case, each a best of `rounds`;
    reports the median of the per-repeat speed ratios (load on a shared machine drifts)."""
    report = {"sgemm_gflops": sgemm_rate(), "cases": {}}
    for case in CASES:
        steps = {impl: make_step(impl, case) for impl in ("torch", "cpu")}
        for step in steps.values():
            step()  # warm up
        times = {impl: [] for impl in steps}
        for _ in range(repeat):
            for impl, step in steps.items():
                times[impl].append(min(_timed(step) for _ in range(rounds)))
        flop = CASES[case][2]
        ratios = [t / c for t, c in zip(times["torch"], times["cpu"], strict=True)]
        report["cases"][case] = {
            "torch_gflops": flop / statistics.median(times["torch"]) / 1e9,
            "cpu_gflops": flop / statistics.median(times["cpu"]) / 1e9,
            "median_speedup": statistics.median(ratios),
            "speedups": ratios,
        }
    report["peak_memory_mib"] = {f"{impl} {'fwd+bwd' if backward else 'fwd'}": peak_memory_growth_mib(impl, backward)
                                 for impl in ("torch", "cpu") for backward in (False, True)}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    report = compare(args.repeat, args.rounds)
    sgemm = report["sgemm_gflops"]
    print(f"threads {torch.get_num_threads()}, sgemm {sgemm:.0f} GFLOP/s (2048^3)")
    print(f"{'case':18s} {'torch GFLOP/s':>14s} {'cpu GFLOP/s':>12s} {'cpu/sgemm':>10s} {'median speedup':>15s}")
    for case, row in report["cases"].items():
        print(f"{case:18s} {row['torch_gflops']:14.1f} {row['cpu_gflops']:12.1f} {row['cpu_gflops'] / sgemm:10.2f} "
              f"{row['median_speedup']:14.2f}x   runs: {', '.join(f'{r:.2f}' for r in row['speedups'])}")
    for name, mib in report["peak_memory_mib"].items():
        print(f"peak memory growth, one head L=S=16384 fp32, {name}: {mib:.0f} MiB")


if __name__ == "__main__":
    main()
