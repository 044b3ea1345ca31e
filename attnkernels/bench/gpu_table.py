"""The fixed benchmark table of the GPU check (scripts/gpu_check.sh), against torch in the same run.

    python -m attnkernels.bench.gpu_table --out DIR            # on a GPU
    python -m attnkernels.bench.gpu_table --out DIR --dry-run  # tiny sizes on the CPU (CI)

Rows: the machine's measured copy bandwidth and bf16 matrix rate; attention (bf16, head dim 64 and
128, L = S = 4k and 16k, causal and not, forward and forward+backward) for attnkernels' cuda and
triton backends (triton is the default on CUDA tensors), torch's SDPA default and its cuDNN backend;
2-D and 3-D grid_sample and the fused 3-D affine_grid_sample (forward and forward+backward, fp32
and bf16) for attnkernels' cuda and triton backends against torch. Each
result is checked before it is timed: attention against torch's, sampling against float64 (the
FlashAttention rule: at most twice torch's own error). Rows go to DIR/bench.jsonl as they are
measured (a run stopped by its time limit keeps them) and the table to DIR/bench.md after each part.
Each op's default backend comes first (Triton attention, which autotunes from a cold cache; CUDA
sampling), the CUDA attention kernels last.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .timing import FULL, TimingBudget, copy_bandwidth, fraction_of_limit, matmul_throughput, time_callable

# A dry run checks the table's code on tiny CPU inputs: one timed call each is enough.
DRY_RUN = TimingBudget(warmup_s=0.0, measure_s=0.0, min_repetitions=1, max_repetitions=1)


@dataclass
class Row:
    op: str
    direction: str  # "fwd" or "fwd+bwd"
    shape: str
    dtype: str
    impl: str
    seconds: float | None = None
    rate: float | None = None  # FLOP/s for attention, bytes/s for sampling
    unit: str = ""
    vs_torch: float | None = None  # torch's time over ours: > 1 is faster than torch
    fraction_of_limit: float | None = None
    error: float | None = None  # max |result - torch| on the checked output (- float64 where the table has it)
    note: str = ""
    extra: dict = field(default_factory=dict)


def _attention_flops(batch: int, heads: int, length: int, head_dim: int, causal: bool, backward: bool) -> float:
    """Matrix-product FLOPs: 2 products forward, 5 in the FA2 backward; half of them when causal."""
    forward = 4.0 * batch * heads * length * length * head_dim
    total = forward * (3.5 if backward else 1.0)
    return total / 2 if causal else total


def _sampling_bytes(input: torch.Tensor, out_points: int, coords_per_point: int, backward: bool) -> float:
    """Fewest bytes: input read, output written (and the grid read when stored); backward adds
    grad_output read, grad_input written, input read again."""
    element = input.element_size()
    output = input.shape[0] * input.shape[1] * out_points * element
    grid = input.shape[0] * out_points * coords_per_point * element
    forward = input.numel() * element + output + grid
    return forward + (output + 2 * input.numel() * element + grid if backward else 0)


def _cudnn_context():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.CUDNN_ATTENTION)


class Table:
    """Times implementations of one configuration against the torch row measured first."""

    def __init__(self, out_dir: Path, device: torch.device, budget: TimingBudget, limits: dict[str, float]):
        self.out_dir = out_dir
        self.device = device
        self.budget = budget
        self.limits = limits
        self.rows: list[Row] = []
        self.jsonl = (out_dir / "bench.jsonl").open("a")

    def record(self, row: Row) -> None:
        self.rows.append(row)
        self.jsonl.write(json.dumps(asdict(row)) + "\n")
        self.jsonl.flush()
        speed = f"{row.vs_torch:.2f}x torch" if row.vs_torch else ""
        took = f"{row.seconds * 1e3:.3f} ms" if row.seconds else "-"
        print(f"{row.op:22s} {row.direction:8s} {row.shape:28s} {row.dtype:9s} {row.impl:18s} {took:>12s} "
              f"{speed:>12s} {row.note}", flush=True)

    def measure(self, base: Row, impls: dict[str, Callable[[], torch.Tensor]], work: float, unit: str,
                limit: float, tolerance: float, context: dict[str, Callable[[], contextlib.AbstractContextManager]],
                exact: Callable[[], torch.Tensor] | None = None) -> None:
        """Check each implementation's output, then time it; torch first.

        Without `exact`, an output passes within `tolerance` of torch's. With it (a float64 result of the
        same inputs), by the FlashAttention rule: its error against `exact` at most twice torch's own,
        plus `tolerance`; in low precision torch's own error can be large (a bf16 affine grid is)."""
        expected = exact().detach().double() if exact is not None else None
        torch_error = None
        torch_seconds = None
        for name, fn in impls.items():
            row = Row(**{**asdict(base), "impl": name, "unit": unit})
            make_context = context.get(name, contextlib.nullcontext)
            try:
                with make_context():
                    result = fn()
                    if name == "torch" and exact is None:
                        expected = result.detach().double()
                    elif name == "torch":
                        torch_error = row.error = (result.detach().double() - expected).abs().max().item()
                    elif expected is not None:
                        row.error = (result.detach().double() - expected).abs().max().item()
                        allowed = tolerance + (2 * torch_error if torch_error is not None else 0.0)
                        if not math.isfinite(row.error) or row.error > allowed:
                            against = "float64" if exact is not None else "torch"
                            row.note = f"WRONG (max difference {row.error:.3g} from {against} > {allowed:g}); not timed"
                            self.record(row)
                            continue
                    del result
                    timing = time_callable(fn, self.device, self.budget)
            except Exception as error:  # an unsupported configuration is a row, not a crash
                row.note = f"not run: {type(error).__name__}: {str(error).splitlines()[0][:160]}"
                self.record(row)
                continue
            row.seconds = timing.seconds
            row.rate = work / timing.seconds
            row.fraction_of_limit = fraction_of_limit(work, timing.fastest, row.rate, limit) if limit else None
            if name == "torch":
                torch_seconds = timing.seconds
            elif torch_seconds:
                row.vs_torch = torch_seconds / timing.seconds
            self.record(row)

    def write_markdown(self, header: list[str]) -> None:
        lines = [*header, "", "| op | pass | shape | dtype | impl | ms | rate | vs torch | of limit | note |",
                 "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in self.rows:
            scale, unit = (1e12, "TFLOP/s") if r.unit == "flop" else (1e9, "GB/s")
            lines.append(
                f"| {r.op} | {r.direction} | {r.shape} | {r.dtype} | {r.impl} | "
                f"{'' if r.seconds is None else f'{r.seconds * 1e3:.3f}'} | "
                f"{'' if r.rate is None else f'{r.rate / scale:.1f} {unit}'} | "
                f"{'' if r.vs_torch is None else f'{r.vs_torch:.2f}x'} | "
                f"{'' if r.fraction_of_limit is None else f'{100 * r.fraction_of_limit:.0f}%'} | {r.note} |")
        (self.out_dir / "bench.md").write_text("\n".join(lines) + "\n")


def attention_configs(dry_run: bool) -> Iterator[tuple[int, int, int, int, bool, bool]]:
    """(batch, heads, length, head_dim, causal, backward): the same tokens per configuration."""
    lengths = (64, 128) if dry_run else (4096, 16384)
    for head_dim in (64, 128):
        for length in lengths:
            batch = max(1, (256 if dry_run else 32768) // length)
            for causal in (False, True):
                for backward in (False, True):
                    yield batch, (2 if dry_run else 16), length, head_dim, causal, backward


def _attention_call(impl: str, q, k, v, causal: bool, backward: bool, grad) -> Callable[[], torch.Tensor]:
    import attnkernels

    def forward():
        if impl.startswith("torch"):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        backend = None if impl == "attnkernels" else impl.split(":", 1)[1]
        return attnkernels.scaled_dot_product_attention(q, k, v, is_causal=causal, backend=backend)

    if not backward:
        return forward

    def forward_backward():
        out = forward()
        out.backward(grad)
        return out

    return forward_backward


def run_attention(table: Table, dry_run: bool, dtype: torch.dtype, triton_rows: bool) -> None:
    device = table.device
    generator = torch.Generator(device=device).manual_seed(0)
    configs = list(attention_configs(dry_run))
    if dry_run and triton_rows:
        configs = configs[:2]  # the interpreter runs each tile op in numpy: the code path, not the table
    for batch, heads, length, head_dim, causal, backward in configs:
        shape = (batch, heads, length, head_dim)
        q, k, v = (torch.randn(shape, device=device, dtype=dtype, generator=generator).requires_grad_(backward)
                   for _ in range(3))
        grad = torch.randn(shape, device=device, dtype=dtype, generator=generator)
        impls = ["torch"]
        if device.type == "cuda":
            impls.append("torch-cudnn")
        compiled = "attnkernels:cuda" if device.type == "cuda" else "attnkernels"
        impls.append("attnkernels:triton" if triton_rows else compiled)
        base = Row("attention" + ("_causal" if causal else ""), "fwd+bwd" if backward else "fwd",
                   "x".join(map(str, shape)), str(dtype).replace("torch.", ""), "")
        work = _attention_flops(batch, heads, length, head_dim, causal, backward)
        table.measure(base, {name: _attention_call(name, q, k, v, causal, backward, grad) for name in impls},
                      work, "flop", table.limits.get("matmul_flops", 0.0), tolerance=0.05,
                      context={"torch-cudnn": _cudnn_context})


def _sampling_backends(device: torch.device) -> tuple[str, ...]:
    """Our backends to time on this device: on a GPU the CUDA kernels and the Triton ones, each by name."""
    return ("cuda", "triton") if device.type == "cuda" else ("cpu",)


def _two_input_call(fn, first: torch.Tensor, second: torch.Tensor, backward: bool, grad: torch.Tensor):
    """A timed call: fn(first, second), and its backward from `grad` when `backward`."""
    def call():
        out = fn(first, second)
        if backward:
            out.backward(grad)
        return out
    return call


def run_sampling(table: Table, dry_run: bool, dtypes: tuple[torch.dtype, ...]) -> None:
    import attnkernels

    device = table.device
    generator = torch.Generator(device=device).manual_seed(1)
    ours = _sampling_backends(device)
    # Images (16 of 64 channels at 128 x 128, a spatial transformer's feature maps), a video volume
    # (16 frames at 112 x 112, as the CPU targets) and 16 RGB clips for the fused sampler.
    images = (2, 4, 8, 8) if dry_run else (16, 64, 128, 128)
    volume = (1, 4, 4, 8, 8) if dry_run else (4, 32, 16, 112, 112)
    clips = (2, 3, 4, 8, 8) if dry_run else (16, 3, 16, 112, 112)
    for dtype in dtypes:
        for backward in (False, True):
            direction = "fwd+bwd" if backward else "fwd"
            for shape in (images, volume):
                dims = len(shape) - 2
                x = torch.randn(shape, device=device, dtype=dtype, generator=generator).requires_grad_(backward)
                theta = torch.eye(dims, dims + 1, device=device).repeat(shape[0], 1, 1)
                theta = (theta + 0.1 * torch.randn(theta.shape, device=device, generator=generator)).to(dtype)
                grid = F.affine_grid(theta, list(shape), align_corners=False).detach().requires_grad_(backward)
                grad = torch.randn(shape, device=device, dtype=dtype, generator=generator)

                impls = {"torch": _two_input_call(lambda a, g: F.grid_sample(a, g, align_corners=False),
                                                  x, grid, backward, grad)}
                for name in ours:
                    impls[f"attnkernels:{name}"] = _two_input_call(
                        lambda a, g, name=name: attnkernels.grid_sample(a, g, align_corners=False, backend=name),
                        x, grid, backward, grad)
                base = Row(f"grid_sample_{dims}d", direction, "x".join(map(str, shape)),
                           str(dtype).replace("torch.", ""), "")
                table.measure(base, impls, _sampling_bytes(x, math.prod(shape[2:]), dims, backward), "byte",
                              table.limits.get("copy_bytes", 0.0), tolerance=1e-3, context={},
                              exact=lambda x=x, grid=grid: F.grid_sample(x.detach().double(), grid.detach().double(),
                                                                         align_corners=False))

            c = torch.randn(clips, device=device, dtype=dtype, generator=generator).requires_grad_(backward)
            theta_c = torch.eye(3, 4, device=device).repeat(clips[0], 1, 1)
            theta_c = (theta_c + 0.1 * torch.randn(theta_c.shape, device=device, generator=generator)).to(dtype)
            theta_c.requires_grad_(backward)
            grad_c = torch.randn(clips, device=device, dtype=dtype, generator=generator)

            impls = {"torch": _two_input_call(lambda a, t: F.grid_sample(
                a, F.affine_grid(t, list(clips), align_corners=False), align_corners=False), c, theta_c, backward,
                grad_c)}
            for name in ours:
                impls[f"attnkernels:{name}"] = _two_input_call(
                    lambda a, t, name=name: attnkernels.affine_grid_sample(a, t, align_corners=False, backend=name),
                    c, theta_c, backward, grad_c)
            base = Row("affine_grid_sample_3d", direction, "x".join(map(str, clips)), str(dtype).replace("torch.", ""),
                       "")
            table.measure(base, impls, _sampling_bytes(c, math.prod(clips[2:]), 0, backward), "byte",
                          table.limits.get("copy_bytes", 0.0), tolerance=1e-3, context={},
                          exact=lambda c=c, theta_c=theta_c: F.grid_sample(
                              c.detach().double(),
                              F.affine_grid(theta_c.detach().double(), list(clips), align_corners=False),
                              align_corners=False))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the GPU check's fixed benchmark table")
    parser.add_argument("--out", required=True, help="folder for bench.jsonl and bench.md")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (the table's code, not speed)")
    parser.add_argument("--skip-triton", action="store_true", help="leave out the triton rows (they autotune)")
    args = parser.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        device, budget = torch.device("cpu"), DRY_RUN
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA GPU is visible (use --dry-run on the CPU)")
        device, budget = torch.device("cuda"), FULL
    start = time.perf_counter()
    limits = {"copy_bytes": copy_bandwidth(device, budget, small=args.dry_run),
              "matmul_flops": matmul_throughput(device, torch.bfloat16 if device.type == "cuda" else torch.float32,
                                                budget, small=args.dry_run)}
    header = [f"# GPU check benchmark ({device})", "",
              f"torch {torch.__version__}, CUDA {torch.version.cuda}",
              f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}",
              f"measured copy bandwidth {limits['copy_bytes'] / 1e9:.0f} GB/s (read + write), "
              f"matrix rate {limits['matmul_flops'] / 1e12:.1f} TFLOP/s "
              f"({'bf16' if device.type == 'cuda' else 'fp32'} 8192^3 or smaller)"]
    print("\n".join(header), flush=True)
    table = Table(out_dir, device, budget, limits)
    table.jsonl.write(json.dumps({"limits": limits, "torch": torch.__version__}) + "\n")
    attention_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sampling_dtypes = (torch.float32, torch.bfloat16) if device.type == "cuda" else (torch.float32,)
    # The default backend of each op first (Triton for attention, CUDA for sampling), so that a run
    # cut short by its time limit still has them; the CUDA attention kernels last.
    if not args.skip_triton:
        run_attention(table, args.dry_run, attention_dtype, triton_rows=True)
        table.write_markdown(header)
    run_sampling(table, args.dry_run, sampling_dtypes)
    table.write_markdown(header)
    run_attention(table, args.dry_run, attention_dtype, triton_rows=False)
    table.write_markdown(header)
    wrong = [r for r in table.rows if r.note.startswith("WRONG")]
    print(f"{len(table.rows)} rows, {len(wrong)} wrong, {time.perf_counter() - start:.0f} s", flush=True)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
