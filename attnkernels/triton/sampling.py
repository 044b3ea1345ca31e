"""grid_sample and the fused affine_grid_sample on Triton: ``attnkernels::triton_grid_sample``,
``attnkernels::triton_affine_grid_sample`` and their backward ops.

Registered with ``torch.library.triton_op`` and launched through ``wrap_triton``, so
``torch.compile(fullgraph=True)`` sees the kernels; fake kernels and autograd (double backward
included) are the sampling ops' shared ones (``attnkernels/_library/sampling.py``). The fused
sampler computes each point's coordinates from theta in the kernel: the grid is never stored, and
the theta gradient is summed from per-program partial sums in a fixed order.
"""

from __future__ import annotations

import torch
import triton
from torch.library import triton_op, wrap_triton

from .._library.sampling import register_sampler
from ._sampler import (
    accumulation_dtype,
    block_sizes,
    input_geometry,
    input_gradient,
    item_extent,
    launch_grid,
    needs_wide_offsets,
    output_geometry,
    sample_backward_kernel,
    sample_forward_kernel,
    tl_dtype,
)

# Taps per axis of each interpolation (bilinear, nearest, bicubic).
_TAPS = {0: 2, 1: 1, 2: 4}
_NO_GRID_STRIDES = (0, 0, 0, 0, 0)


def grid_geometry(grid: torch.Tensor) -> tuple[int, ...]:
    """Grid strides (n, d, h, w, k), with d = 0 for 2-D grids."""
    if grid.dim() == 4:
        n_, h_, w_, k_ = grid.stride()
        return (n_, 0, h_, w_, k_)
    return tuple(grid.stride())


def _launch_shape(input: torch.Tensor, spatial: list[int], interpolation: int):
    """(input sizes (D, H, W), input strides, output sizes (OD, OH, OW), BLOCK_P, BLOCK_C) of a launch."""
    input_sizes, input_strides = input_geometry(input)
    block_p, block_c = block_sizes(input.shape[1], _TAPS[interpolation] ** (input.dim() - 2))
    return input_sizes, input_strides, output_geometry(spatial), block_p, block_c


def _channels_last_buffer(input: torch.Tensor, needed: bool) -> torch.Tensor:
    """The input gradient's accumulation buffer (N, [D,] H, W, C): the atomics of one tap hit contiguous channels."""
    shape = (input.shape[0], *input.shape[2:], input.shape[1]) if needed else (0,)
    return torch.zeros(shape, dtype=accumulation_dtype(input.dtype), device=input.device)


def _as_volume(grad_output: torch.Tensor) -> torch.Tensor:
    return grad_output if grad_output.dim() == 5 else grad_output.unsqueeze(2)


@triton_op("attnkernels::triton_grid_sample", mutates_args={})
def _grid_sample_op(input: torch.Tensor, grid: torch.Tensor, interpolation: int, padding: int,
                    align_corners: bool) -> torch.Tensor:
    """input: (N, C, [D,] H, W); grid: (N, [Do,] Ho, Wo, dims) -> (N, C, [Do,] Ho, Wo)."""
    batch, channels = input.shape[:2]
    spatial = list(grid.shape[1:-1])
    out = torch.empty((batch, channels, *spatial), dtype=input.dtype, device=input.device)
    if out.numel() == 0:
        return out
    (ID, IH, IW), in_strides, (OD, OH, OW), block_p, block_c = _launch_shape(input, spatial, interpolation)
    wide = needs_wide_offsets(item_extent(input), item_extent(grid), item_extent(out))
    wrap_triton(sample_forward_kernel)[launch_grid(batch, OD * OH * OW, block_p)](
        input, grid, out, channels, ID, IH, IW, OD, OH, OW, *in_strides, *grid_geometry(grid),
        MODE=interpolation, PADDING=padding, ALIGN_CORNERS=align_corners, DIMS=input.dim() - 2, AFFINE=False,
        ACC=tl_dtype(accumulation_dtype(input.dtype)), BLOCK_P=block_p, BLOCK_C=block_c, WIDE=wide)
    return out


@triton_op("attnkernels::triton_grid_sample_backward", mutates_args={})
def _grid_sample_backward_op(grad_output: torch.Tensor, input: torch.Tensor, grid: torch.Tensor, interpolation: int,
                             padding: int, align_corners: bool,
                             output_mask: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients to input (N, C, [D,] H, W) and grid (N, [Do,] Ho, Wo, dims); empty where not asked."""
    need_input, need_grid = bool(output_mask[0]), bool(output_mask[1])
    batch, channels = input.shape[:2]
    grad_source = _channels_last_buffer(input, need_input)
    grad_grid = torch.zeros(grid.shape if need_grid else (0,), dtype=grid.dtype, device=grid.device)
    if grad_output.numel() > 0 and (need_input or need_grid):
        (ID, IH, IW), in_strides, (OD, OH, OW), block_p, block_c = _launch_shape(input, list(grid.shape[1:-1]),
                                                                                 interpolation)
        go = _as_volume(grad_output)
        wide = needs_wide_offsets(item_extent(input), item_extent(grid), item_extent(go),
                                  input[0].numel() + channels)
        wrap_triton(sample_backward_kernel)[launch_grid(batch, OD * OH * OW, block_p)](
            go, input, grid, grad_source, grad_grid, channels, ID, IH, IW, OD, OH, OW,
            *go.stride(), *in_strides, *grid_geometry(grid),
            MODE=interpolation, PADDING=padding, ALIGN_CORNERS=align_corners, DIMS=input.dim() - 2, AFFINE=False,
            ACC=tl_dtype(grad_source.dtype), NEED_INPUT=need_input, NEED_COORDS=need_grid,
            BLOCK_P=block_p, BLOCK_C=block_c, WIDE=wide)
    grad_input = input_gradient(grad_source, input) if need_input else input.new_empty((0,))
    return grad_input, grad_grid


@triton_op("attnkernels::triton_affine_grid_sample", mutates_args={})
def _affine_grid_sample_op(input: torch.Tensor, theta: torch.Tensor, size: list[int], interpolation: int,
                           padding: int, align_corners: bool) -> torch.Tensor:
    """input: (N, C, [D,] H, W); theta: (N, dims, dims + 1) -> a tensor of ``size`` (N, C, [Do,] Ho, Wo)."""
    out = torch.empty(tuple(size), dtype=input.dtype, device=input.device)
    if out.numel() == 0:
        return out
    batch, channels = input.shape[:2]
    (ID, IH, IW), in_strides, (OD, OH, OW), block_p, block_c = _launch_shape(input, list(size[2:]), interpolation)
    wide = needs_wide_offsets(item_extent(input), item_extent(out))
    wrap_triton(sample_forward_kernel)[launch_grid(batch, OD * OH * OW, block_p)](
        input, theta.contiguous(), out, channels, ID, IH, IW, OD, OH, OW, *in_strides, *_NO_GRID_STRIDES,
        MODE=interpolation, PADDING=padding, ALIGN_CORNERS=align_corners, DIMS=input.dim() - 2, AFFINE=True,
        ACC=tl_dtype(accumulation_dtype(input.dtype)), BLOCK_P=block_p, BLOCK_C=block_c, WIDE=wide)
    return out


@triton_op("attnkernels::triton_affine_grid_sample_backward", mutates_args={})
def _affine_grid_sample_backward_op(grad_output: torch.Tensor, input: torch.Tensor, theta: torch.Tensor,
                                    size: list[int], interpolation: int, padding: int, align_corners: bool,
                                    output_mask: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients to input (N, C, [D,] H, W) and theta (N, dims, dims + 1); empty where not asked."""
    need_input, need_theta = bool(output_mask[0]), bool(output_mask[1])
    batch, channels = input.shape[:2]
    dims = input.dim() - 2
    (ID, IH, IW), in_strides, (OD, OH, OW), block_p, block_c = _launch_shape(input, list(size[2:]), interpolation)
    grad_source = _channels_last_buffer(input, need_input)
    blocks = triton.cdiv(OD * OH * OW, block_p)
    partial_theta = torch.zeros((batch, blocks, dims * (dims + 1)) if need_theta else (0,), dtype=grad_source.dtype,
                                device=input.device)
    if grad_output.numel() > 0 and (need_input or need_theta):
        go = _as_volume(grad_output)
        wide = needs_wide_offsets(item_extent(input), item_extent(go), input[0].numel() + channels)
        wrap_triton(sample_backward_kernel)[launch_grid(batch, OD * OH * OW, block_p)](
            go, input, theta.contiguous(), grad_source, partial_theta, channels, ID, IH, IW, OD, OH, OW,
            *go.stride(), *in_strides, *_NO_GRID_STRIDES,
            MODE=interpolation, PADDING=padding, ALIGN_CORNERS=align_corners, DIMS=dims, AFFINE=True,
            ACC=tl_dtype(grad_source.dtype), NEED_INPUT=need_input, NEED_COORDS=need_theta,
            BLOCK_P=block_p, BLOCK_C=block_c, WIDE=wide)
    grad_input = input_gradient(grad_source, input) if need_input else input.new_empty((0,))
    if need_theta:
        grad_theta = partial_theta.sum(1).view(batch, dims, dims + 1).to(theta.dtype)
    else:
        grad_theta = theta.new_empty((0,))
    return grad_input, grad_theta


register_sampler("grid_sample", _grid_sample_op, _grid_sample_backward_op)
register_sampler("affine_grid_sample", _affine_grid_sample_op, _affine_grid_sample_backward_op)


def grid_sample(input: torch.Tensor, grid: torch.Tensor, interpolation: int, padding: int,
                align_corners: bool) -> torch.Tensor:
    """Runs the Triton grid_sample on validated arguments (modes as numbers, see ``attnkernels._modes``)."""
    return _grid_sample_op(input, grid, int(interpolation), int(padding), bool(align_corners))


def affine_grid_sample(input: torch.Tensor, theta: torch.Tensor, size: list[int], interpolation: int, padding: int,
                       align_corners: bool) -> torch.Tensor:
    """Runs the Triton affine_grid_sample on validated arguments."""
    return _affine_grid_sample_op(input, theta, [int(s) for s in size], int(interpolation), int(padding),
                                  bool(align_corners))
