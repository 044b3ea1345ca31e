"""The fused affine_grid + grid_sample on Triton: ``attnkernels::triton_affine_grid_sample``.

Each point's coordinates are theta applied to affine_grid's base grid,
computed in the kernel: the grid is never stored. The backward gives the
input gradient and the theta gradient (per-program partial sums, added in a
fixed order).
"""

from __future__ import annotations

import torch
import triton
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
_NO_GRID_STRIDES = (0, 0, 0, 0, 0)


@triton_op("attnkernels::triton_affine_grid_sample", mutates_args={})
def _affine_grid_sample_op(input: torch.Tensor, theta: torch.Tensor, size: list[int], interpolation: int,
                           padding: int, align_corners: bool) -> torch.Tensor:
    """input: (N, C, [D,] H, W); theta: (N, dims, dims + 1) -> a tensor of ``size`` (N, C, [Do,] Ho, Wo)."""
    out = torch.empty(tuple(size), dtype=input.dtype, device=input.device)
    if out.numel() == 0:
        return out
    batch, channels = input.shape[:2]
    dims = input.dim() - 2
    (ID, IH, IW), in_strides = input_geometry(input)
    OD, OH, OW = output_geometry(list(size[2:]))
    block_p, block_c = block_sizes(channels, _TAPS[interpolation] ** dims)
    wide = needs_wide_offsets(item_extent(input), item_extent(out))
    wrap_triton(sample_forward_kernel)[launch_grid(batch, OD * OH * OW, block_p)](
        input, theta.contiguous(), out, channels, ID, IH, IW, OD, OH, OW, *in_strides, *_NO_GRID_STRIDES,
        MODE=interpolation, PADDING=padding, ALIGN_CORNERS=align_corners, DIMS=dims, AFFINE=True,
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
    acc = accumulation_dtype(input.dtype)
    (ID, IH, IW), in_strides = input_geometry(input)
    OD, OH, OW = output_geometry(list(size[2:]))
    block_p, block_c = block_sizes(channels, _TAPS[interpolation] ** dims)
    blocks = triton.cdiv(OD * OH * OW, block_p)
    grad_source = torch.zeros((batch, *input.shape[2:], channels) if need_input else (0,), dtype=acc,
                              device=input.device)
    partial_theta = torch.zeros((batch, blocks, dims * (dims + 1)) if need_theta else (0,), dtype=acc,
                                device=input.device)
    if grad_output.numel() > 0 and (need_input or need_theta):
        go = grad_output if grad_output.dim() == 5 else grad_output.unsqueeze(2)
        wide = needs_wide_offsets(item_extent(input), item_extent(go), input[0].numel() + channels)
        wrap_triton(sample_backward_kernel)[launch_grid(batch, OD * OH * OW, block_p)](
            go, input, theta.contiguous(), grad_source, partial_theta, channels, ID, IH, IW, OD, OH, OW,
            *go.stride(), *in_strides, *_NO_GRID_STRIDES,
            MODE=interpolation, PADDING=padding, ALIGN_CORNERS=align_corners, DIMS=dims, AFFINE=True,
            ACC=tl_dtype(acc), NEED_INPUT=need_input, NEED_COORDS=need_theta,
            BLOCK_P=block_p, BLOCK_C=block_c, WIDE=wide)
    grad_input = input_gradient(grad_source, input) if need_input else input.new_empty((0,))
    if need_theta:
        grad_theta = partial_theta.sum(1).view(batch, dims, dims + 1).to(theta.dtype)
    else:
        grad_theta = theta.new_empty((0,))
    return grad_input, grad_theta


def _setup(ctx, inputs, output):
    input, theta, size, interpolation, padding, align_corners = inputs
    ctx.save_for_backward(input, theta)
    ctx.options = (size, interpolation, padding, align_corners)


def _backward(ctx, grad_output):
    input, theta = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1]]
    grad_input, grad_theta = _affine_grid_sample_backward_op(grad_output, input, theta, *ctx.options, mask)
    return (grad_input if mask[0] else None, grad_theta if mask[1] else None, None, None, None, None)


_affine_grid_sample_op.register_autograd(_backward, setup_context=_setup)


def _backward_setup(ctx, inputs, output):
    grad_output, input, theta, size, interpolation, padding, align_corners, output_mask = inputs
    ctx.save_for_backward(grad_output, input, theta)
    ctx.options = (size, interpolation, padding, align_corners)
    ctx.output_mask = output_mask


def _double_backward(ctx, grad_grad_input, grad_grad_theta):
    grad_output, input, theta = ctx.saved_tensors
    size, interpolation, padding, align_corners = ctx.options

    def forward(x, t):
        return reference.affine_grid_sample(x, t, size, _MODE_NAMES[interpolation], _PADDING_NAMES[padding],
                                            align_corners)

    grads = second_order(forward, grad_output, (input, theta), ctx.output_mask, (grad_grad_input, grad_grad_theta))
    return (*grads, None, None, None, None, None)


_affine_grid_sample_backward_op.register_autograd(_double_backward, setup_context=_backward_setup)


@_affine_grid_sample_op.register_fake
def _affine_grid_sample_fake(input, theta, size, interpolation, padding, align_corners):
    return input.new_empty(tuple(size))


@_affine_grid_sample_backward_op.register_fake
def _affine_grid_sample_backward_fake(grad_output, input, theta, size, interpolation, padding, align_corners,
                                      output_mask):
    grad_input = empty_gradient_like(input, output_mask[0])
    grad_theta = theta.new_empty(theta.shape if output_mask[1] else (0,))
    return grad_input, grad_theta


def affine_grid_sample(input: torch.Tensor, theta: torch.Tensor, size: list[int], interpolation: int, padding: int,
                       align_corners: bool) -> torch.Tensor:
    """The hook attnkernels.affine_grid_sample calls once it has validated the arguments."""
    return _affine_grid_sample_op(input, theta, [int(s) for s in size], int(interpolation), int(padding),
                                  bool(align_corners))
