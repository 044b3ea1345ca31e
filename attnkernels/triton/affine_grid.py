"""affine_grid on Triton: ``attnkernels::triton_affine_grid``.

One program computes a block of output points of one batch item: the base coordinate of each axis
(torch's linspace, evaluated from both ends), then grid = [x, y(, z), 1] · thetaᵀ, accumulated in
float32 (float64 for float64). The backward is a small contraction written in PyTorch
(grad_theta = grad_gridᵀ · base), differentiable again; fake kernel and autograd are registered
with the other backends' affine_grid (``attnkernels/_library/sampling.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .._library.sampling import register_affine_grid
from ..reference.grid_sample import base_grid
from ._sampler import accumulation_dtype, tl_dtype

_BLOCK = 128


@triton.jit
def _base(i, n, ALIGN_CORNERS: tl.constexpr, ACC: tl.constexpr):
    """Base coordinate of position i of n, as torch's linspace(-1, 1, n) (times (n - 1) / n without
    align_corners); a single position sits at 0."""
    # tl.cast, not .to(): Triton turns an int argument equal to 1 into a constant, which has no .to()
    last = tl.cast(n - 1, ACC)
    step = 2.0 / tl.maximum(last, 1.0)
    from_start = -1.0 + step * tl.cast(i, ACC)
    from_end = 1.0 - step * tl.cast(n - 1 - i, ACC)
    value = tl.where(i < n // 2, from_start, from_end)
    if not ALIGN_CORNERS:
        value = value * last / tl.cast(n, ACC)
    return tl.where(n > 1, value, 0.0)


@triton.jit
def _affine_grid_kernel(theta_ptr, grid_ptr, D, H, W, DIMS: tl.constexpr, ALIGN_CORNERS: tl.constexpr,
                        ACC: tl.constexpr, BLOCK: tl.constexpr):
    block = tl.program_id(0)
    n = tl.program_id(1)
    points = D * H * W
    p = block * BLOCK + tl.arange(0, BLOCK)
    live = p < points
    w = p % W
    h = (p // W) % H
    d = p // (W * H)
    x = _base(w, W, ALIGN_CORNERS, ACC)
    y = _base(h, H, ALIGN_CORNERS, ACC)
    z = _base(d, D, ALIGN_CORNERS, ACC)
    row = DIMS + 1
    theta = theta_ptr + n * DIMS * row
    out = grid_ptr + (n * points + p.to(tl.int64)) * DIMS
    for a in tl.static_range(DIMS):
        value = tl.load(theta + a * row + 0).to(ACC) * x + tl.load(theta + a * row + 1).to(ACC) * y
        if DIMS == 3:
            value += tl.load(theta + a * row + 2).to(ACC) * z
        value += tl.load(theta + a * row + DIMS).to(ACC)
        tl.store(out + a, value.to(grid_ptr.dtype.element_ty), mask=live)


@triton_op("attnkernels::triton_affine_grid", mutates_args={})
def _affine_grid_op(theta: torch.Tensor, size: list[int], align_corners: bool) -> torch.Tensor:
    """theta: (N, dims, dims + 1) for size (N, C, [D,] H, W) -> grid (N, [D,] H, W, dims)."""
    dims = len(size) - 2
    grid = torch.empty((size[0], *size[2:], dims), dtype=theta.dtype, device=theta.device)
    if grid.numel() == 0:
        return grid
    D, H, W = ([1] * (3 - dims) + list(size[2:]))
    launch = (triton.cdiv(D * H * W, _BLOCK), size[0])
    wrap_triton(_affine_grid_kernel)[launch](
        theta.contiguous(), grid, D, H, W, DIMS=dims, ALIGN_CORNERS=align_corners,
        ACC=tl_dtype(accumulation_dtype(theta.dtype)), BLOCK=_BLOCK)
    return grid


def _transpose(grad_grid: torch.Tensor, size: list[int], align_corners: bool) -> torch.Tensor:
    """The backward, in PyTorch (differentiable again): grid[n, p, a] = sum_j theta[n, a, j] base[p, j],
    so grad_theta[n] = grad_grid[n]ᵀ · base."""
    dims = len(size) - 2
    acc = accumulation_dtype(grad_grid.dtype)
    base = base_grid(size, align_corners, acc, grad_grid.device).reshape(-1, dims + 1)
    flat = grad_grid.to(acc).reshape(size[0], -1, dims)
    return torch.matmul(flat.transpose(1, 2), base).to(grad_grid.dtype)


register_affine_grid(_affine_grid_op, _transpose)


def affine_grid(theta: torch.Tensor, size: list[int], align_corners: bool) -> torch.Tensor:
    """Runs the Triton affine_grid on validated arguments."""
    return _affine_grid_op(theta, [int(s) for s in size], bool(align_corners))
