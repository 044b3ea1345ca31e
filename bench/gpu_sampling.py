"""GPU timing of the hand-written CUDA sampling kernels against torch on the same card.

    python bench/gpu_sampling.py [--quick] [--markdown OUT.md] [--json OUT.json]

Cases (issue 5 targets in brackets):
  - grid_sample 3-D, fp32 and bf16, C = 16, 32, 64, a 16 x 112 x 112 video volume per item, contiguous and
    channels-last: forward time, GB/s by the byte count (grid read + output written + input read once) and its
    fraction of the measured copy bandwidth [>= 1.0x torch, >= 60 % of copy]; backward (input and grid
    gradients) time vs torch's grid_sampler_3d_backward [>= 3x], and our deterministic backward (torch has none).
  - fused affine_grid_sample vs torch's affine_grid + grid_sample, forward and forward + backward [>= 1.5x].
Each result is compared with torch before it is timed. Timings are CUDA-event medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
import torch.nn.functional as F

import attnkernels


def cuda_time_ms(fn, warmup: int = 3, repeats: int = 20) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy of 1 GiB, counting the bytes read and written."""
    src = torch.empty(2**28, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), repeats=10)
    return 2 * src.numel() * 4 / ms / 1e6


def warp_grid(batch: int, out: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """A smooth random warp near the identity (a video-registration-like displacement field)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    dims = len(out)
    theta = torch.eye(dims, dims + 1, device="cuda").expand(batch, dims, dims + 1).clone()
    theta += 0.05 * torch.randn(theta.shape, generator=gen, device="cuda")
    grid = F.affine_grid(theta, (batch, 1, *out), align_corners=False)
    grid += 0.02 * torch.randn(grid.shape, generator=gen, device="cuda")
    return grid.to(dtype)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def grid_sample_row(dtype: torch.dtype, channels: int, layout: str, quick: bool, copy_gbs: float) -> dict:
    frames, side = (8, 64) if quick else (16, 112)
    batch = 2 if quick else 4
    x = torch.randn((batch, channels, frames, side, side), device="cuda", dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    g = warp_grid(batch, (frames, side, side), dtype)
    elt = x.element_size()
    points = batch * frames * side * side
    bytes_moved = points * 3 * elt + points * channels * elt + x.numel() * elt

    def ours_fwd():
        return attnkernels.grid_sample(x, g, "bilinear", "zeros", False, backend="cuda")

    def torch_fwd():
        return F.grid_sample(x, g, "bilinear", "zeros", False)

    fwd_diff = max_diff(ours_fwd(), torch_fwd())
    t_ours, t_torch = cuda_time_ms(ours_fwd), cuda_time_ms(torch_fwd)

    go = torch.randn((batch, channels, frames, side, side), device="cuda", dtype=dtype)

    def ours_bwd():
        return torch.ops.attnkernels.grid_sample_backward(go, x, g, 0, 0, False, [True, True])

    def torch_bwd():
        return torch.ops.aten.grid_sampler_3d_backward(go, x, g, 0, 0, False, [True, True])

    b_ours, b_torch = ours_bwd(), torch_bwd()
    bwd_diff = max(max_diff(b_ours[0], b_torch[0]), max_diff(b_ours[1], b_torch[1]))
    tb_ours, tb_torch = cuda_time_ms(ours_bwd), cuda_time_ms(torch_bwd)
    torch.use_deterministic_algorithms(True)
    try:
        tb_det = cuda_time_ms(ours_bwd, repeats=5)
    finally:
        torch.use_deterministic_algorithms(False)
    gbs = bytes_moved / t_ours / 1e6
    return {
        "op": "grid_sample 3-D bilinear", "dtype": str(dtype).removeprefix("torch."),
        "shape": f"{batch}x{channels}x{frames}x{side}x{side}", "layout": layout,
        "fwd_ms": t_ours, "torch_fwd_ms": t_torch, "fwd_speedup": t_torch / t_ours,
        "fwd_GBps": gbs, "fwd_copy_fraction": gbs / copy_gbs,
        "bwd_ms": tb_ours, "torch_bwd_ms": tb_torch, "bwd_speedup": tb_torch / tb_ours,
        "deterministic_bwd_ms": tb_det, "fwd_max_diff": fwd_diff, "bwd_max_diff": bwd_diff,
    }


def affine_row(dtype: torch.dtype, channels: int, dims: int, quick: bool) -> dict:
    frames, side = (8, 64) if quick else (16, 112)
    batch = 2 if quick else 4
    spatial = (frames, side, side) if dims == 3 else (side * 2, side * 2)
    x = torch.randn((batch, channels, *spatial), device="cuda", dtype=dtype)
    gen = torch.Generator(device="cuda").manual_seed(1)
    theta = torch.eye(dims, dims + 1, device="cuda").expand(batch, dims, dims + 1).clone()
    theta = (theta + 0.1 * torch.randn(theta.shape, generator=gen, device="cuda")).to(dtype)
    size = list(x.shape)

    def ours_fwd():
        return attnkernels.affine_grid_sample(x, theta, size, "bilinear", "zeros", False, backend="cuda")

    def torch_fwd():
        return F.grid_sample(x, F.affine_grid(theta, size, False), "bilinear", "zeros", False)

    diff = max_diff(ours_fwd(), torch_fwd())
    t_ours, t_torch = cuda_time_ms(ours_fwd), cuda_time_ms(torch_fwd)
    xr, tr = x.detach().requires_grad_(True), theta.detach().requires_grad_(True)
    go = torch.randn(size, device="cuda", dtype=dtype)

    def ours_train():
        out = attnkernels.affine_grid_sample(xr, tr, size, "bilinear", "zeros", False, backend="cuda")
        return torch.autograd.grad(out, (xr, tr), go)

    def torch_train():
        out = F.grid_sample(xr, F.affine_grid(tr, size, False), "bilinear", "zeros", False)
        return torch.autograd.grad(out, (xr, tr), go)

    tt_ours, tt_torch = cuda_time_ms(ours_train), cuda_time_ms(torch_train)
    return {
        "op": f"affine_grid_sample {dims}-D bilinear", "dtype": str(dtype).removeprefix("torch."),
        "shape": "x".join(map(str, size)), "layout": "contiguous",
        "fwd_ms": t_ours, "torch_fwd_ms": t_torch, "fwd_speedup": t_torch / t_ours,
        "fwd_bwd_ms": tt_ours, "torch_fwd_bwd_ms": tt_torch, "fwd_bwd_speedup": tt_torch / tt_ours,
        "fwd_max_diff": diff,
    }


def all_rows(quick: bool, copy_gbs: float) -> list[dict]:
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for channels in (16, 32, 64):
            for layout in ("contiguous", "channels_last"):
                rows.append(grid_sample_row(dtype, channels, layout, quick, copy_gbs))
                torch.cuda.empty_cache()
    for dtype in (torch.float32, torch.bfloat16):
        for channels in (16, 64):
            for dims in (2, 3):
                rows.append(affine_row(dtype, channels, dims, quick))
                torch.cuda.empty_cache()
    return rows


def markdown(rows: list[dict], copy_gbs: float) -> str:
    props = torch.cuda.get_device_properties(0)
    lines = [f"Card: {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, "
             f"CUDA {torch.version.cuda}; measured copy bandwidth {copy_gbs:.0f} GB/s (read + write).", ""]
    keys = sorted({k for row in rows for k in row}, key=lambda k: list(rows[0]).index(k) if k in rows[0] else 99)
    for group in ({r["op"].split()[0] for r in rows}):
        subset = [r for r in rows if r["op"].startswith(group)]
        cols = [k for k in keys if any(k in r for r in subset)]
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "---|" * len(cols))
        for r in subset:
            cells = [f"{r[k]:.3g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in cols]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small volumes (a smoke test of the script)")
    parser.add_argument("--markdown", default=None, help="write the tables here")
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or not attnkernels._extension.has_kernel("grid_sample", "CUDA"):
        print("gpu_sampling: needs a GPU and attnkernels built with its CUDA kernels", file=sys.stderr)
        return 2
    copy_gbs = copy_bandwidth_gbs()
    rows = all_rows(args.quick, copy_gbs)
    text = markdown(rows, copy_gbs)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"copy_GBps": copy_gbs, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
