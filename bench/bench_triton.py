"""GPU benchmarks of the Triton backend against torch on the same card (issue 4).

    python bench/bench_triton.py                       # both tables, markdown, in one call
    python bench/bench_triton.py --quick               # one length / one channel count (a smoke run)
    python bench/bench_triton.py --only attention --dtype bfloat16 --head-dim 128 --json out.json
    pytest bench/bench_triton.py --benchmark-only      # the same cases under pytest-benchmark

Attention: bf16 and fp16, head dim 64 and 128, L = S = 1k .. 16k, causal and not; batch x L
= 16k tokens and heads x head dim = 2048 (FlashAttention's benchmark convention). Forward and
backward (the backward alone, from a retained graph) of the triton backend against
torch.nn.functional.scaled_dot_product_attention (flash or cuDNN), in TFLOP/s with the FLOP
count 4·B·H·L·S·E (half when causal), backward 2.5x forward, and as a fraction of the H100's
989 dense bf16 TFLOP/s.

grid_sample 3-D: a 16 x 112 x 112 video volume per item, 4 items, C = 16, 32, 64, fp32 and
bf16, an affine grid. Forward and backward (input and grid gradients) against torch, and the
fused affine_grid_sample against affine_grid + grid_sample; GB/s by the ideal byte count
(input read once + grid read + output written; backward: grad_output, input and grid read,
both gradients written) and as a fraction of a device-to-device copy measured in the same run.

The first call per (dtype, head dim, causal) compiles and autotunes every config: on a 10-minute
device call, run the attention table in parts (--dtype, --head-dim); Triton's cache keeps the
compiled kernels for the next part on the same machine.

Every case is checked against torch before it is timed. Timings: triton.testing.do_bench
(median, L2 flushed between runs). Needs a CUDA GPU: without one the pytest cases skip and the
script exits.
"""

from __future__ import annotations

import argparse
import json
import sys

import pytest
import torch
import torch.nn.functional as F

import attnkernels

PEAK_TFLOPS = 989.0  # H100 SXM dense bf16
TOKENS = 16384
HEAD_WIDTH = 2048
LENGTHS = (1024, 2048, 4096, 8192, 16384)
HEAD_DIMS = (64, 128)
ATTENTION_DTYPES = (torch.bfloat16, torch.float16)
CHANNELS = (16, 32, 64)
VOLUME = (4, 16, 112, 112)  # items, depth, height, width
SAMPLING_DTYPES = (torch.float32, torch.bfloat16)


def median_ms(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


# ----------------------------------------------------------------------------- attention


def attention_inputs(length: int, head_dim: int, dtype: torch.dtype, requires_grad: bool):
    batch, heads = max(1, TOKENS // length), HEAD_WIDTH // head_dim
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(batch, heads, length, head_dim, device="cuda", dtype=dtype, generator=gen)
               .requires_grad_(requires_grad) for _ in range(3))
    return q, k, v


def attention_fn(impl: str):
    if impl == "torch":
        return lambda q, k, v, causal: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return lambda q, k, v, causal: attnkernels.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                                            backend="triton")


def attention_flop(q: torch.Tensor, causal: bool, direction: str) -> float:
    batch, heads, length, head_dim = q.shape
    forward = 4 * batch * heads * length * length * head_dim / (2 if causal else 1)
    return forward * (2.5 if direction == "backward" else 1.0)


def attention_step(impl: str, length: int, head_dim: int, dtype: torch.dtype, causal: bool, direction: str):
    """(callable timing one step, q) after checking the triton result against torch."""
    q, k, v = attention_inputs(length, head_dim, dtype, direction == "backward")
    fn = attention_fn(impl)
    if impl != "torch":
        with torch.no_grad():
            ours = fn(q, k, v, causal)
            theirs = attention_fn("torch")(q, k, v, causal)
        torch.testing.assert_close(ours, theirs, rtol=2e-2, atol=2e-2)
    if direction == "forward":
        def step():
            with torch.no_grad():
                fn(q, k, v, causal)
        return step, q
    out = fn(q, k, v, causal)
    grad_out = torch.randn_like(out)

    def step():
        torch.autograd.grad(out, (q, k, v), grad_out, retain_graph=True)
    return step, q


def attention_rows(quick: bool, dtypes=ATTENTION_DTYPES, head_dims=HEAD_DIMS):
    lengths = LENGTHS[:1] if quick else LENGTHS
    rows = []
    for dtype in dtypes:
        for head_dim in head_dims:
            for causal in (False, True):
                for length in lengths:
                    for direction in ("forward", "backward"):
                        result = {"dtype": str(dtype).replace("torch.", ""), "head_dim": head_dim, "causal": causal,
                                  "L=S": length, "direction": direction}
                        for impl in ("torch", "triton"):
                            step, q = attention_step(impl, length, head_dim, dtype, causal, direction)
                            ms = median_ms(step)
                            result[f"{impl}_ms"] = ms
                            result[f"{impl}_tflops"] = attention_flop(q, causal, direction) / ms / 1e9
                            del step, q
                            torch.cuda.empty_cache()
                        result["speedup"] = result["torch_ms"] / result["triton_ms"]
                        result["triton_of_peak"] = result["triton_tflops"] / PEAK_TFLOPS
                        rows.append(result)
                        print(format_attention(result), file=sys.stderr, flush=True)
    return rows


def format_attention(r) -> str:
    causal = "yes" if r["causal"] else "no"
    return (f"| {r['dtype']} | {r['head_dim']} | {causal} | {r['L=S']} | {r['direction']} | "
            f"{r['torch_tflops']:.0f} | {r['triton_tflops']:.0f} | {r['speedup']:.2f}x | "
            f"{100 * r['triton_of_peak']:.0f} % |")


# ----------------------------------------------------------------------------- grid_sample 3-D


def sampling_inputs(channels: int, dtype: torch.dtype, requires_grad: bool):
    items, depth, height, width = VOLUME
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(items, channels, depth, height, width, device="cuda", dtype=dtype, generator=gen)
    theta = torch.eye(3, 4, device="cuda").repeat(items, 1, 1)
    theta = (theta + 0.1 * torch.randn(theta.shape, device="cuda", generator=gen)).to(dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return x.requires_grad_(requires_grad), grid.requires_grad_(requires_grad), theta.requires_grad_(requires_grad)


def sampling_bytes(x: torch.Tensor, grid: torch.Tensor, direction: str, fused: bool) -> int:
    volume, out, grid_bytes = x.numel() * x.element_size(), x.numel() * x.element_size(), 0
    if not fused:
        grid_bytes = grid.numel() * grid.element_size()
    if direction == "forward":
        return volume + grid_bytes + out
    return out + volume + grid_bytes + volume + grid_bytes  # read grad_out, input, grid; write both gradients


def sampling_fn(impl: str, fused: bool):
    if fused:
        if impl == "torch":
            return lambda x, grid, theta: F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False),
                                                        "bilinear", "zeros", False)
        return lambda x, grid, theta: attnkernels.affine_grid_sample(x, theta, None, "bilinear", "zeros", False,
                                                                     backend=impl)
    if impl == "torch":
        return lambda x, grid, theta: F.grid_sample(x, grid, "bilinear", "zeros", False)
    return lambda x, grid, theta: attnkernels.grid_sample(x, grid, "bilinear", "zeros", False, backend=impl)


def sampling_step(impl: str, channels: int, dtype: torch.dtype, direction: str, fused: bool):
    x, grid, theta = sampling_inputs(channels, dtype, direction == "backward")
    fn = sampling_fn(impl, fused)
    if impl != "torch":
        with torch.no_grad():
            torch.testing.assert_close(fn(x, grid, theta), sampling_fn("torch", fused)(x, grid, theta),
                                       rtol=2e-2, atol=2e-2)
    if direction == "forward":
        def step():
            with torch.no_grad():
                fn(x, grid, theta)
        return step, x, grid
    out = fn(x, grid, theta)
    grad_out = torch.randn_like(out)
    wrt = (x, theta) if fused else (x, grid)

    def step():
        torch.autograd.grad(out, wrt, grad_out, retain_graph=True)
    return step, x, grid


def copy_bandwidth() -> float:
    """GB/s of a 1 GiB device-to-device copy, counting the read and the write."""
    src = torch.empty(1 << 28, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / median_ms(lambda: dst.copy_(src)) / 1e6


def sampling_rows(quick: bool):
    copy = copy_bandwidth()
    print(f"device copy: {copy:.0f} GB/s", file=sys.stderr)
    rows = []
    for fused in (False, True):
        for dtype in SAMPLING_DTYPES:
            for channels in CHANNELS[:1] if quick else CHANNELS:
                for direction in ("forward", "backward"):
                    result = {"op": "affine_grid_sample" if fused else "grid_sample",
                              "dtype": str(dtype).replace("torch.", ""), "C": channels, "direction": direction,
                              "copy_gbps": copy}
                    for impl in ("torch", "triton"):
                        step, x, grid = sampling_step(impl, channels, dtype, direction, fused)
                        ms = median_ms(step)
                        result[f"{impl}_ms"] = ms
                        result[f"{impl}_gbps"] = sampling_bytes(x, grid, direction, fused) / ms / 1e6
                        del step, x, grid
                        torch.cuda.empty_cache()
                    result["speedup"] = result["torch_ms"] / result["triton_ms"]
                    rows.append(result)
                    print(format_sampling(result), file=sys.stderr, flush=True)
    return rows


def format_sampling(r) -> str:
    return (f"| {r['op']} | {r['dtype']} | {r['C']} | {r['direction']} | {r['torch_ms']:.3f} | {r['triton_ms']:.3f} | "
            f"{r['speedup']:.2f}x | {r['triton_gbps']:.0f} | {100 * r['triton_gbps'] / r['copy_gbps']:.0f} % |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one length and one channel count")
    parser.add_argument("--only", choices=("attention", "sampling"), default=None)
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default=None, help="attention: one dtype only")
    parser.add_argument("--head-dim", type=int, choices=HEAD_DIMS, default=None, help="attention: one head dim only")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_triton.py measures CUDA kernels: no GPU here", file=sys.stderr)
        return 1
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    results = {}
    if args.only in (None, "attention"):
        print("\n| dtype | head dim | causal | L = S | pass | torch TFLOP/s | triton TFLOP/s | speedup | of 989 |")
        print("|---|---|---|---|---|---|---|---|---|")
        dtypes = (getattr(torch, args.dtype),) if args.dtype else ATTENTION_DTYPES
        head_dims = (args.head_dim,) if args.head_dim else HEAD_DIMS
        results["attention"] = attention_rows(args.quick, dtypes, head_dims)
        for row in results["attention"]:
            print(format_attention(row))
    if args.only in (None, "sampling"):
        print("\n| op | dtype | C | pass | torch ms | triton ms | speedup | triton GB/s | of copy |")
        print("|---|---|---|---|---|---|---|---|---|")
        results["sampling"] = sampling_rows(args.quick)
        for row in results["sampling"]:
            print(format_sampling(row))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


# ----------------------------------------------------------------------------- pytest-benchmark

# bench/ has no conftest hook for the `cuda` marker: skip here too.
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _bench(benchmark, step):
    def synchronized():
        step()
        torch.cuda.synchronize()
    synchronized()
    benchmark.pedantic(synchronized, rounds=20, warmup_rounds=3)


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ("torch", "triton"))
@pytest.mark.parametrize("direction", ("forward", "backward"))
@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
@pytest.mark.parametrize("length", (1024, 4096, 16384))
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", ATTENTION_DTYPES, ids=str)
def test_attention(benchmark, impl, direction, causal, length, head_dim, dtype):
    step, q = attention_step(impl, length, head_dim, dtype, causal, direction)
    benchmark.extra_info["tflop"] = attention_flop(q, causal, direction) / 1e12
    _bench(benchmark, step)


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ("torch", "triton"))
@pytest.mark.parametrize("direction", ("forward", "backward"))
@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("dtype", SAMPLING_DTYPES, ids=str)
@pytest.mark.parametrize("fused", (False, True), ids=("grid_sample", "affine_grid_sample"))
def test_grid_sample_3d(benchmark, impl, direction, channels, dtype, fused):
    step, x, grid = sampling_step(impl, channels, dtype, direction, fused)
    benchmark.extra_info["gigabytes"] = sampling_bytes(x, grid, direction, fused) / 1e9
    _bench(benchmark, step)


if __name__ == "__main__":
    sys.exit(main())
