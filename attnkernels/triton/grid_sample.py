"""grid_sample on Triton: ``attnkernels::triton_grid_sample`` and its backward op.

Registered with ``torch.library.triton_op`` and launched through
``wrap_triton``, so ``torch.compile(fullgraph=True)`` sees the kernels. The
backward op is itself differentiable (double backward through the plain
PyTorch reference, like the C++ ops).
"""

from __future__ import annotations

import torch
from torch.library import triton_op, wrap_triton

from .. import reference
from .._gradients import second_order
from .._modes import INTERPOLATIONS, PADDINGS
from ._sampler import (
    accumulation_dtype,
    block_sizes,
    empty_gradient_like,
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

_MODE_NAMES = {v: k for k, v in INTERPOLATIONS.items()}
_PADDING_NAMES = {v: k for k, v in PADDINGS.items()}
_TAPS = {0: 2, 1: 1, 2: 4}


def grid_geometry(grid: torch.Tensor) -> tuple[int, ...]:
    """Grid strides (n, d, h, w, k), with d = 0 for 2-D grids."""
    if grid.dim() == 4:
        n_, h_, w_, k_ = grid.stride()
        return (n_, 0, h_, w_, k_)
    return tuple(grid.stride())


@triton_op("attnkernels::triton_grid_sample", mutates_args={})
def _grid_sample_op(input: torch.Tensor, grid: torch.Tensor, interpolation: int, padding: int,
                    align_corners: bool) -> torch.Tensor:
    """input: (N, C, [D,] H, W); grid: (N, [Do,] Ho, Wo, dims) -> (N, C, [Do,] Ho, Wo)."""
    batch, channels = input.shape[:2]
    spatial = list(grid.shape[1:-1])
    out = torch.empty((batch, channels, *spatial), dtype=input.dtype, device=input.device)
    if out.numel() == 0:
        return out
    (ID, IH, IW), in_strides = input_geometry(input)
    OD, OH, OW = output_geometry(spatial)
    dims = input.dim() - 2
    block_p, block_c = block_sizes(channels, _TAPS[interpolation] ** dims)
    wide = needs_wide_offsets(item_extent(input), item_extent(grid), item_extent(out))
    wrap_triton(sample_forward_kernel)[launch_grid(batch, OD * OH * OW, block_p)](
        input, grid, out, channels, ID, IH, IW, OD, OH, OW, *in_strides, *grid_geometry(grid),
        MODE=interpolation, PADDING=padding, ALIGN_CORNERS=align_corners, DIMS=dims, AFFINE=False,
        ACC=tl_dtype(accumulation_dtype(input.dtype)), BLOCK_P=block_p, BLOCK_C=block_c, WIDE=wide)
    return out


@triton_op("attnkernels::triton_grid_sample_backward", mutates_args={})
def _grid_sample_backward_op(grad_output: torch.Tensor, input: torch.Tensor, grid: torch.Tensor, interpolation: int,
                             padding: int, align_corners: bool,
                             output_mask: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients to input (N, C, [D,] H, W) and grid (N, [Do,] Ho, Wo, dims); empty where not asked."""
    need_input, need_grid = bool(output_mask[0]), bool(output_mask[1])
    batch, channels = input.shape[:2]
    dims = input.dim() - 2
    acc = accumulation_dtype(input.dtype)
    # Channels-last accumulation buffer: the atomics of one tap hit contiguous channels.
    grad_source = torch.zeros((batch, *input.shape[2:], channels) if need_input else (0,), dtype=acc,
                              device=input.device)
    grad_grid = torch.zeros(grid.shape if need_grid else (0,), dtype=grid.dtype, device=grid.device)
    if grad_output.numel() > 0 and (need_input or need_grid):
        (ID, IH, IW), in_strides = input_geometry(input)
        OD, OH, OW = output_geometry(list(grid.shape[1:-1]))
        go = grad_output if grad_output.dim() == 5 else grad_output.unsqueeze(2)
        block_p, block_c = block_sizes(channels, _TAPS[interpolation] ** dims)
        wide = needs_wide_offsets(item_extent(input), item_extent(grid), item_extent(go),
                                  input[0].numel() + channels)
        wrap_triton(sample_backward_kernel)[launch_grid(batch, OD * OH * OW, block_p)](
            go, input, grid, grad_source, grad_grid, channels, ID, IH, IW, OD, OH, OW,
            *go.stride(), *in_strides, *grid_geometry(grid),
            MODE=interpolation, PADDING=padding, ALIGN_CORNERS=align_corners, DIMS=dims, AFFINE=False,
            ACC=tl_dtype(acc), NEED_INPUT=need_input, NEED_COORDS=need_grid,
            BLOCK_P=block_p, BLOCK_C=block_c, WIDE=wide)
    grad_input = input_gradient(grad_source, input) if need_input else input.new_empty((0,))
    return grad_input, grad_grid


def _setup(ctx, inputs, output):
    input, grid, interpolation, padding, align_corners = inputs
    ctx.save_for_backward(input, grid)
    ctx.options = (interpolation, padding, align_corners)


def _backward(ctx, grad_output):
    input, grid = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1]]
    grad_input, grad_grid = _grid_sample_backward_op(grad_output, input, grid, *ctx.options, mask)
    return (grad_input if mask[0] else None, grad_grid if mask[1] else None, None, None, None)


_grid_sample_op.register_autograd(_backward, setup_context=_setup)


def _backward_setup(ctx, inputs, output):
    grad_output, input, grid, interpolation, padding, align_corners, output_mask = inputs
    ctx.save_for_backward(grad_output, input, grid)
    ctx.options = (interpolation, padding, align_corners)
    ctx.output_mask = output_mask


def _double_backward(ctx, grad_grad_input, grad_grad_grid):
    grad_output, input, grid = ctx.saved_tensors
    interpolation, padding, align_corners = ctx.options

    def forward(x, g):
        return reference.grid_sample(x, g, _MODE_NAMES[interpolation], _PADDING_NAMES[padding], align_corners)

    grads = second_order(forward, grad_output, (input, grid), ctx.output_mask, (grad_grad_input, grad_grad_grid))
    return (*grads, None, None, None, None)


_grid_sample_backward_op.register_autograd(_double_backward, setup_context=_backward_setup)


@_grid_sample_op.register_fake
def _grid_sample_fake(input, grid, interpolation, padding, align_corners):
    return input.new_empty((input.shape[0], input.shape[1], *grid.shape[1:-1]))


@_grid_sample_backward_op.register_fake
def _grid_sample_backward_fake(grad_output, input, grid, interpolation, padding, align_corners, output_mask):
    grad_input = empty_gradient_like(input, output_mask[0])
    grad_grid = grid.new_empty(grid.shape if output_mask[1] else (0,))
    return grad_input, grad_grid


def grid_sample(input: torch.Tensor, grid: torch.Tensor, interpolation: int, padding: int,
                align_corners: bool) -> torch.Tensor:
    """The hook attnkernels.grid_sample calls once it has validated the arguments."""
    return _grid_sample_op(input, grid, int(interpolation), int(padding), bool(align_corners))
