"""A small workload that calls every compiled kernel once, for compute-sanitizer (scripts/gpu_check.sh).

    compute-sanitizer --tool memcheck python scripts/gpu_workload.py
    compute-sanitizer --tool racecheck python scripts/gpu_workload.py --only attention
    python scripts/gpu_workload.py --device cpu          # the same calls on CPU tensors (the dry run)

Odd sizes (tails of every tile), 2-D and 3-D, every interpolation mode, both backward paths of the
sampler (atomic and deterministic), and attention with a mask, causal, GQA and dropout. Each result
is compared with the reference backend, so a kernel that reads the wrong memory fails here too.
"""

from __future__ import annotations

import argparse
import sys

import torch

import attnkernels


def _close(name: str, ours: torch.Tensor, expected: torch.Tensor, tolerance: float) -> None:
    difference = (ours.double() - expected.double()).abs().max().item() if ours.numel() else 0.0
    if not difference <= tolerance:
        raise AssertionError(f"{name}: max difference {difference:.3g} from the reference > {tolerance:g}")


def sampling(device: torch.device, backend: str) -> int:
    calls = 0
    generator = torch.Generator(device="cpu").manual_seed(0)
    for dims, mode in ((2, "bilinear"), (2, "bicubic"), (3, "bilinear"), (3, "nearest"), (3, "bicubic")):
        spatial = (5, 7) if dims == 2 else (3, 5, 7)
        out_spatial = (6, 9) if dims == 2 else (4, 6, 9)
        x = torch.randn((2, 3, *spatial), generator=generator).to(device)
        theta = (torch.eye(dims, dims + 1) + 0.2 * torch.randn(2, dims, dims + 1, generator=generator)).to(device)
        size = [2, 3, *out_spatial]
        grid = attnkernels.affine_grid(theta, size, align_corners=False, backend=backend)
        _close("affine_grid", grid, attnkernels.affine_grid(theta, size, align_corners=False, backend="reference"),
               1e-5)
        for deterministic in (False, True):
            torch.use_deterministic_algorithms(deterministic)
            try:
                for padding in ("zeros", "border", "reflection"):
                    results = []
                    for which in (backend, "reference"):
                        a = x.clone().requires_grad_(True)
                        g = grid.clone().requires_grad_(True)
                        out = attnkernels.grid_sample(a, g, mode, padding, align_corners=False, backend=which)
                        out.backward(torch.ones_like(out))
                        results.append((out, a.grad, g.grad))
                        calls += 2
                    for name, ours, expected in zip(("out", "grad_input", "grad_grid"), *results, strict=True):
                        _close(f"grid_sample {dims}-D {mode} {padding} {name}", ours, expected, 1e-3)
                    if mode != "bicubic" or dims == 2:
                        results = []
                        for which in (backend, "reference"):
                            a = x.clone().requires_grad_(True)
                            t = theta.clone().requires_grad_(True)
                            out = attnkernels.affine_grid_sample(a, t, size, mode, padding, False, backend=which)
                            out.backward(torch.ones_like(out))
                            results.append((out, a.grad, t.grad))
                            calls += 2
                        for name, ours, expected in zip(("out", "grad_input", "grad_theta"), *results, strict=True):
                            _close(f"affine_grid_sample {dims}-D {mode} {padding} {name}", ours, expected, 1e-2)
            finally:
                torch.use_deterministic_algorithms(False)
    return calls


def attention(device: torch.device, backend: str, dtype: torch.dtype) -> int:
    calls = 0
    generator = torch.Generator(device="cpu").manual_seed(1)
    for hq, hkv, L, S, E, Ev, causal, masked, dropout in (
            (4, 2, 67, 45, 64, 64, True, False, 0.0), (2, 2, 33, 130, 128, 128, False, True, 0.0),
            (2, 1, 1, 17, 96, 64, False, False, 0.0), (2, 2, 70, 70, 64, 64, False, False, 0.2)):
        q = torch.randn(2, hq, L, E, generator=generator).to(device, dtype)
        k = torch.randn(2, hkv, S, E, generator=generator).to(device, dtype)
        v = torch.randn(2, hkv, S, Ev, generator=generator).to(device, dtype)
        mask = (torch.rand(L, S, generator=generator) > 0.3).to(device) if masked else None
        results = []
        for which in (backend, "reference"):
            leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
            torch.manual_seed(5)  # the same dropout mask for both
            out = attnkernels.scaled_dot_product_attention(*leaves, attn_mask=mask, dropout_p=dropout,
                                                           is_causal=causal, enable_gqa=hq != hkv, backend=which)
            out.backward(torch.ones_like(out))
            results.append((out, *(t.grad for t in leaves)))
            calls += 2
        if dropout == 0.0:  # dropout draws differ between backends; the call itself is what is checked
            for name, ours, expected in zip(("out", "dq", "dk", "dv"), *results, strict=True):
                _close(f"attention {name} (L={L}, S={S}, E={E})", ours, expected, 5e-2)
    return calls


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--only", choices=("sampling", "attention"), default=None)
    parser.add_argument("--backend", default=None, help="default: cuda on CUDA tensors, cpu on CPU tensors")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    backend = args.backend or ("cuda" if device.type == "cuda" else "cpu")
    calls = 0
    if args.only in (None, "sampling"):
        calls += sampling(device, backend)
    if args.only in (None, "attention"):
        attention_backend = backend if backend in attnkernels.available_backends() else "reference"
        for which in dict.fromkeys([attention_backend, "triton" if device.type == "cuda" else attention_backend]):
            try:
                calls += attention(device, which, torch.bfloat16 if device.type == "cuda" else torch.float32)
            except RuntimeError as error:
                if "cannot serve" not in str(error):
                    raise
                print(f"attention on {which}: not served here ({str(error).splitlines()[0]})")
    print(f"gpu_workload: {calls} calls on {device} ({backend}), every result matched the reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
