"""Fake kernels and autograd of the sampling ops, the same rules for every backend's ops.

A sampler pair is forward(input, coords, *options) -> out and
backward(grad_output, input, coords, *options, output_mask) -> (grad_input, grad_coords),
coords being the grid (grid_sample) or theta (affine_grid_sample). The forward's backward is the
backward op; the backward op's own backward (double backward, for gradient penalties) is taken
through the plain-PyTorch reference, which autograd differentiates any number of times.

affine_grid is linear in theta: its backward is the transposed map, whose backward is
affine_grid again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .. import reference
from .._dispatch import call_op, register_autograd
from .._gradients import empty_gradient_like, second_order
from .._modes import INTERPOLATION_NAMES, PADDING_NAMES
from ._devices import check_one_device
from ._names import op_name


def _grid_sample_shape(input: torch.Tensor, grid: torch.Tensor, options: Sequence) -> tuple[int, ...]:
    return (input.shape[0], input.shape[1], *grid.shape[1:-1])


def _grid_sample_reference(input, grid, interpolation, padding, align_corners):
    return reference.grid_sample(input, grid, INTERPOLATION_NAMES[interpolation], PADDING_NAMES[padding],
                                 align_corners)


def _affine_grid_sample_shape(input: torch.Tensor, theta: torch.Tensor, options: Sequence) -> tuple[int, ...]:
    return tuple(options[0])  # the size


def _affine_grid_sample_reference(input, theta, size, interpolation, padding, align_corners):
    return reference.affine_grid_sample(input, theta, size, INTERPOLATION_NAMES[interpolation],
                                        PADDING_NAMES[padding], align_corners)


# What differs between the two sampler families: the name of coords, the output's shape, the reference.
_FAMILIES = {
    "grid_sample": ("grid", _grid_sample_shape, _grid_sample_reference),
    "affine_grid_sample": ("theta", _affine_grid_sample_shape, _affine_grid_sample_reference),
}


def register_sampler(family: str, forward, backward) -> None:
    """Registers fake kernels and autograd of one backend's ``family`` pair ("grid_sample" or
    "affine_grid_sample"): ``forward`` and ``backward`` are torch OpOverloads or Triton CustomOpDefs."""
    coords_name, output_shape, reference_forward = _FAMILIES[family]
    forward_name, backward_name = op_name(forward), op_name(backward)

    def forward_fake(input, coords, *options):
        check_one_device(forward_name, input=input, **{coords_name: coords})
        return input.new_empty(output_shape(input, coords, options))

    def backward_fake(grad_output, input, coords, *options_and_mask):
        check_one_device(backward_name, input=input, **{coords_name: coords}, grad_output=grad_output)
        output_mask = options_and_mask[-1]
        return (empty_gradient_like(input, output_mask[0]),
                coords.new_empty(coords.shape if output_mask[1] else (0,)))

    def setup(ctx, inputs, output):
        input, coords, *options = inputs
        ctx.save_for_backward(input, coords)
        ctx.options = tuple(options)

    def backward_of_forward(ctx, grad_output):
        input, coords = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1]]
        grad_input, grad_coords = call_op(backward, (grad_output, input, coords, *ctx.options, mask),
                                          (grad_output, input, coords))
        return (grad_input if mask[0] else None, grad_coords if mask[1] else None, *(None,) * len(ctx.options))

    def backward_setup(ctx, inputs, output):
        grad_output, input, coords, *options, output_mask = inputs
        ctx.save_for_backward(grad_output, input, coords)
        ctx.options = tuple(options)
        ctx.output_mask = output_mask

    def double_backward(ctx, grad_grad_input, grad_grad_coords):
        grad_output, input, coords = ctx.saved_tensors

        def forward_through_reference(x, c):
            return reference_forward(x, c, *ctx.options)

        grads = second_order(forward_through_reference, grad_output, (input, coords), ctx.output_mask,
                             (grad_grad_input, grad_grad_coords))
        return (*grads, *(None,) * (len(ctx.options) + 1))

    torch.library.register_fake(forward, forward_fake)
    torch.library.register_fake(backward, backward_fake)
    register_autograd(forward, backward_of_forward, setup_context=setup)
    register_autograd(backward, double_backward, setup_context=backward_setup)


def affine_grid_fake(theta, size, align_corners):
    """theta (N, dims, dims + 1) -> grid (N, [D,] H, W, dims) for size (N, C, [D,] H, W)."""
    return theta.new_empty((size[0], *size[2:], len(size) - 2))


def register_affine_grid(forward, transpose: Callable, transpose_op=None) -> None:
    """Registers the fake kernel and autograd of one backend's affine_grid.

    transpose(grad_grid, size, align_corners) -> grad_theta is the backward: a registered op
    (``transpose_op``, given its fake kernel and autograd here too, its backward being ``forward``)
    or plain PyTorch that autograd differentiates itself.
    """
    def setup(ctx, inputs, output):
        theta, size, align_corners = inputs
        ctx.options = (size, align_corners)

    def backward_of_forward(ctx, grad_grid):
        return transpose(grad_grid.contiguous(), *ctx.options), None, None

    torch.library.register_fake(forward, affine_grid_fake)
    register_autograd(forward, backward_of_forward, setup_context=setup)
    if transpose_op is None:
        return

    def transpose_fake(grad_grid, size, align_corners):
        dims = len(size) - 2
        return grad_grid.new_empty((size[0], dims, dims + 1))

    def backward_of_transpose(ctx, grad_grad_theta):
        return forward(grad_grad_theta, *ctx.options), None, None

    torch.library.register_fake(transpose_op, transpose_fake)
    register_autograd(transpose_op, backward_of_transpose, setup_context=setup)
