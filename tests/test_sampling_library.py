"""The registered operators: gradcheck, double backward, opcheck and torch.compile."""

from __future__ import annotations

import pytest
import torch
from conftest import cpu_backends
from sampling_cases import MODES, PADDINGS, make_grid, make_input

import attnkernels
from attnkernels import _extension

needs_extension = pytest.mark.skipif(not _extension.has_extension(), reason="the extension is not built")
COMPILED = [b for b in cpu_backends() if b in ("cpu",)]


def small(dims):
    x = make_input(dims, batch=1, channels=2, spatial=(3, 4, 3) if dims == 3 else (4, 5))
    g = make_grid(dims, batch=1, out=(2, 2, 3) if dims == 3 else (3, 2))
    return x.requires_grad_(True), g.requires_grad_(True)


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b != "triton"])
@pytest.mark.parametrize("dims", (2, 3))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padding", PADDINGS)
def test_gradcheck(backend, dims, mode, padding):
    x, g = small(dims)
    if mode == "nearest":
        g = g.detach()  # piecewise constant in the grid: only the input has a gradient to check

    def fn(x, g):
        return attnkernels.grid_sample(x, g, mode, padding, False, backend=backend)

    assert torch.autograd.gradcheck(fn, (x, g))


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b != "triton"])
@pytest.mark.parametrize("dims", (2, 3))
@pytest.mark.parametrize("padding", PADDINGS)
def test_gradgradcheck_bilinear(backend, dims, padding):
    x, g = small(dims)

    def fn(x, g):
        return attnkernels.grid_sample(x, g, "bilinear", padding, True, backend=backend)

    assert torch.autograd.gradgradcheck(fn, (x, g))


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b != "triton"])
@pytest.mark.parametrize("dims", (2, 3))
@pytest.mark.parametrize("mode", ("bilinear", "bicubic"))
def test_fused_gradcheck_and_gradgradcheck(backend, dims, mode):
    x, _ = small(dims)
    theta = (torch.eye(dims, dims + 1, dtype=torch.float64) * 0.8 + 0.1).unsqueeze(0).requires_grad_(True)
    size = [1, 2, *((3, 2, 4) if dims == 3 else (3, 4))]

    def fn(x, t):
        return attnkernels.affine_grid_sample(x, t, size, mode, "zeros", False, backend=backend)

    assert torch.autograd.gradcheck(fn, (x, theta))
    if mode == "bilinear":
        assert torch.autograd.gradgradcheck(fn, (x, theta))


def test_gradient_penalty_trains():
    """A typical double-backward use: penalise the norm of d out / d grid."""
    x, g = small(2)
    out = attnkernels.grid_sample(x, g, align_corners=False)
    (grad_grid,) = torch.autograd.grad(out.square().sum(), g, create_graph=True)
    penalty = grad_grid.square().sum()
    (second,) = torch.autograd.grad(penalty, x)
    xr, gr = small(2)
    out_ref = attnkernels.grid_sample(xr, gr, align_corners=False, backend="reference")
    (grad_ref,) = torch.autograd.grad(out_ref.square().sum(), gr, create_graph=True)
    (second_ref,) = torch.autograd.grad(grad_ref.square().sum(), xr)
    torch.testing.assert_close(second, second_ref, rtol=0, atol=1e-10)


def _first_and_second_order(function, x, g):
    """The output, the gradients to x and g, and the gradients of their squared norm (double backward)."""
    out = function(x, g)
    grads = torch.autograd.grad(out, (x, g), torch.ones_like(out), create_graph=True)
    second = torch.autograd.grad(sum(t.square().sum() for t in grads), (x, g))
    return out, *grads, *second


@needs_extension
@pytest.mark.parametrize("dims", (2, 3))
def test_eager_autograd_matches_the_registered_autograd(dims):
    """In eager mode the public functions record the op through an autograd.Function that applies the
    registered setup_context and backward (call_op); a direct call of the op goes through
    torch.library's autograd. The two give the same bits, to first and second order, and the eager
    graph node is the Function's."""
    x, g = small(dims)
    ops = torch.ops.attnkernels
    ours = _first_and_second_order(
        lambda a, b: attnkernels.grid_sample(a, b, "bicubic" if dims == 2 else "bilinear", "border",
                                             align_corners=True, backend="cpu"), x, g)
    registered = _first_and_second_order(lambda a, b: ops.grid_sample.default(a, b, 2 if dims == 2 else 0, 1, True),
                                         x, g)
    for a, b in zip(ours, registered, strict=True):
        assert torch.equal(a, b)
    node = attnkernels.grid_sample(x, g, align_corners=False, backend="cpu").grad_fn
    assert type(node).__name__ == "Eager_attnkernels_grid_sampleBackward"
    assert type(ops.grid_sample.default(x, g, 0, 0, False).grad_fn).__name__ != type(node).__name__

    theta = torch.randn(1, dims, dims + 1, dtype=torch.float64, requires_grad=True)
    size = list(x.shape[:2]) + [3] * dims
    fused = _first_and_second_order(
        lambda a, t: attnkernels.affine_grid_sample(a, t, size, align_corners=False, backend="cpu"), x, theta)
    fused_registered = _first_and_second_order(
        lambda a, t: ops.affine_grid_sample.default(a, t, size, 0, 0, False), x, theta)
    for a, b in zip(fused, fused_registered, strict=True):
        assert torch.equal(a, b)


@needs_extension
@pytest.mark.parametrize("dims", (2, 3))
@pytest.mark.parametrize("mode", (0, 1, 2))
def test_opcheck_grid_sample(dims, mode):
    x, g = small(dims)
    ops = torch.ops.attnkernels
    torch.library.opcheck(ops.grid_sample.default, (x, g, mode, 2, False))
    go = torch.randn(x.shape[0], x.shape[1], *g.shape[1:-1], dtype=torch.float64)
    torch.library.opcheck(ops.grid_sample_backward.default,
                          (go, x.detach(), g.detach(), mode, 0, True, [True, True]),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    torch.library.opcheck(ops.grid_sample_backward.default, (go, x.detach(), g.detach(), mode, 0, True,
                                                             [False, True]),
                          test_utils=("test_schema", "test_faketensor"))


@needs_extension
@pytest.mark.parametrize("dims", (2, 3))
def test_opcheck_affine_ops(dims):
    ops = torch.ops.attnkernels
    x, _ = small(dims)
    theta = (torch.eye(dims, dims + 1, dtype=torch.float64) + 0.1).unsqueeze(0).requires_grad_(True)
    size = [1, 2, *((3, 2, 4) if dims == 3 else (3, 4))]
    torch.library.opcheck(ops.affine_grid.default, (theta, size, False))
    torch.library.opcheck(ops.affine_grid_sample.default, (x, theta, size, 0, 1, True))
    grid_grad = torch.randn(1, *size[2:], dims, dtype=torch.float64)
    torch.library.opcheck(ops.affine_grid_backward.default, (grid_grad, size, False))
    # channels-last input: the fake kernel must predict the gradient's layout
    xcl = x.detach().contiguous(memory_format=torch.channels_last if dims == 2 else torch.channels_last_3d)
    go = torch.randn(size, dtype=torch.float64)
    torch.library.opcheck(ops.affine_grid_sample_backward.default,
                          (go, xcl, theta.detach(), size, 0, 0, False, [True, True]),
                          test_utils=("test_schema", "test_faketensor"))


@needs_extension
@pytest.mark.parametrize("dims", (2, 3))
def test_torch_compile_fullgraph(dims):
    torch._dynamo.reset()
    x, g = small(dims)
    theta = (torch.eye(dims, dims + 1, dtype=torch.float64) * 0.9).unsqueeze(0).requires_grad_(True)

    def model(x, g, theta):
        a = attnkernels.grid_sample(x, g, "bilinear", "reflection", False)
        b = attnkernels.affine_grid_sample(x, theta, None, "bilinear", "border", True)
        c = attnkernels.affine_grid(theta, list(x.shape), align_corners=False)
        return a.sum() + b.square().sum() + c.sum()

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x, g, theta)
    grads = torch.autograd.grad(out, (x, g, theta))
    expected = model(x, g, theta)
    expected_grads = torch.autograd.grad(expected, (x, g, theta))
    torch.testing.assert_close(out, expected)
    for a, b in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b)


@needs_extension
def test_torch_compile_inductor():
    torch._dynamo.reset()
    x = make_input(2, dtype=torch.float32)
    g = make_grid(2, dtype=torch.float32)
    fn = torch.compile(lambda x, g: attnkernels.grid_sample(x, g, align_corners=True) * 2, fullgraph=True)
    torch.testing.assert_close(fn(x, g), attnkernels.grid_sample(x, g, align_corners=True) * 2)
