"""Fake kernels and autograd for attnkernels::grid_sample, affine_grid and affine_grid_sample.

The forward ops' backward calls a registered backward op; each backward op is
differentiable in turn (double backward, for gradient penalties): its
gradient is taken through the reference implementation, which autograd can
differentiate any number of times.
"""

from __future__ import annotations

import torch

from .. import reference
from .._gradients import gradient_memory_format, second_order
from .._modes import INTERPOLATIONS, PADDINGS
from ._devices import check_one_device

_ops = torch.ops.attnkernels
_MODE_NAMES = {v: k for k, v in INTERPOLATIONS.items()}
_PADDING_NAMES = {v: k for k, v in PADDINGS.items()}


def _gradient_like(t: torch.Tensor, needed: bool) -> torch.Tensor:
    if not needed:
        return t.new_empty((0,))
    return torch.empty(t.shape, dtype=t.dtype, device=t.device).contiguous(memory_format=gradient_memory_format(t))


# ----------------------------------------------------------------------------- fake kernels


@torch.library.register_fake("attnkernels::grid_sample")
def _grid_sample_fake(input, grid, interpolation, padding, align_corners):
    check_one_device("grid_sample", input=input, grid=grid)
    return input.new_empty((input.shape[0], input.shape[1], *grid.shape[1:-1]))


@torch.library.register_fake("attnkernels::grid_sample_backward")
def _grid_sample_backward_fake(grad_output, input, grid, interpolation, padding, align_corners, output_mask):
    check_one_device("grid_sample_backward", input=input, grid=grid, grad_output=grad_output)
    return _gradient_like(input, output_mask[0]), (grid.new_empty(grid.shape) if output_mask[1]
                                                   else grid.new_empty((0,)))


@torch.library.register_fake("attnkernels::affine_grid")
def _affine_grid_fake(theta, size, align_corners):
    return theta.new_empty((size[0], *size[2:], len(size) - 2))


@torch.library.register_fake("attnkernels::affine_grid_backward")
def _affine_grid_backward_fake(grad_grid, size, align_corners):
    dims = len(size) - 2
    return grad_grid.new_empty((size[0], dims, dims + 1))


@torch.library.register_fake("attnkernels::affine_grid_sample")
def _affine_grid_sample_fake(input, theta, size, interpolation, padding, align_corners):
    check_one_device("affine_grid_sample", input=input, theta=theta)
    return input.new_empty(tuple(size))


@torch.library.register_fake("attnkernels::affine_grid_sample_backward")
def _affine_grid_sample_backward_fake(grad_output, input, theta, size, interpolation, padding, align_corners,
                                      output_mask):
    check_one_device("affine_grid_sample_backward", input=input, theta=theta, grad_output=grad_output)
    return _gradient_like(input, output_mask[0]), (theta.new_empty(theta.shape) if output_mask[1]
                                                   else theta.new_empty((0,)))


# ----------------------------------------------------------------------------- grid_sample autograd


def _grid_sample_setup(ctx, inputs, output):
    input, grid, interpolation, padding, align_corners = inputs
    ctx.save_for_backward(input, grid)
    ctx.options = (interpolation, padding, align_corners)


def _grid_sample_backward(ctx, grad_output):
    input, grid = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1]]
    grad_input, grad_grid = _ops.grid_sample_backward(grad_output, input, grid, *ctx.options, mask)
    return (grad_input if mask[0] else None, grad_grid if mask[1] else None, None, None, None)


torch.library.register_autograd("attnkernels::grid_sample", _grid_sample_backward, setup_context=_grid_sample_setup)


def _grid_sample_backward_setup(ctx, inputs, output):
    grad_output, input, grid, interpolation, padding, align_corners, output_mask = inputs
    ctx.save_for_backward(grad_output, input, grid)
    ctx.options = (interpolation, padding, align_corners)
    ctx.output_mask = output_mask


def _grid_sample_double_backward(ctx, grad_grad_input, grad_grad_grid):
    grad_output, input, grid = ctx.saved_tensors
    interpolation, padding, align_corners = ctx.options

    def forward(x, g):
        return reference.grid_sample(x, g, _MODE_NAMES[interpolation], _PADDING_NAMES[padding], align_corners)

    grads = second_order(forward, grad_output, (input, grid), ctx.output_mask, (grad_grad_input, grad_grad_grid))
    return (*grads, None, None, None, None)


torch.library.register_autograd("attnkernels::grid_sample_backward", _grid_sample_double_backward,
                                setup_context=_grid_sample_backward_setup)


# ----------------------------------------------------------------------------- affine_grid autograd
# affine_grid is linear in theta: its backward is the transposed map, and the
# backward of that is affine_grid again.


def _affine_grid_setup(ctx, inputs, output):
    theta, size, align_corners = inputs
    ctx.options = (size, align_corners)


def _affine_grid_backward(ctx, grad_grid):
    return _ops.affine_grid_backward(grad_grid.contiguous(), *ctx.options), None, None


def _affine_grid_backward_backward(ctx, grad_grad_theta):
    return _ops.affine_grid(grad_grad_theta, *ctx.options), None, None


torch.library.register_autograd("attnkernels::affine_grid", _affine_grid_backward, setup_context=_affine_grid_setup)
torch.library.register_autograd("attnkernels::affine_grid_backward", _affine_grid_backward_backward,
                                setup_context=_affine_grid_setup)


# ----------------------------------------------------------------------------- affine_grid_sample autograd


def _affine_grid_sample_setup(ctx, inputs, output):
    input, theta, size, interpolation, padding, align_corners = inputs
    ctx.save_for_backward(input, theta)
    ctx.options = (size, interpolation, padding, align_corners)


def _affine_grid_sample_backward(ctx, grad_output):
    input, theta = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1]]
    grad_input, grad_theta = _ops.affine_grid_sample_backward(grad_output, input, theta, *ctx.options, mask)
    return (grad_input if mask[0] else None, grad_theta if mask[1] else None, None, None, None, None)


torch.library.register_autograd("attnkernels::affine_grid_sample", _affine_grid_sample_backward,
                                setup_context=_affine_grid_sample_setup)


def _affine_grid_sample_backward_setup(ctx, inputs, output):
    grad_output, input, theta, size, interpolation, padding, align_corners, output_mask = inputs
    ctx.save_for_backward(grad_output, input, theta)
    ctx.options = (size, interpolation, padding, align_corners)
    ctx.output_mask = output_mask


def _affine_grid_sample_double_backward(ctx, grad_grad_input, grad_grad_theta):
    grad_output, input, theta = ctx.saved_tensors
    size, interpolation, padding, align_corners = ctx.options

    def forward(x, t):
        return reference.affine_grid_sample(x, t, size, _MODE_NAMES[interpolation], _PADDING_NAMES[padding],
                                            align_corners)

    grads = second_order(forward, grad_output, (input, theta), ctx.output_mask,
                          (grad_grad_input, grad_grad_theta))
    return (*grads, None, None, None, None, None)


torch.library.register_autograd("attnkernels::affine_grid_sample_backward", _affine_grid_sample_double_backward,
                                setup_context=_affine_grid_sample_backward_setup)
