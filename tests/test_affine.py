"""affine_grid and the fused affine_grid_sample against torch and the reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import cpu_backends
from sampling_cases import LOW_PRECISION, MODES, PADDINGS, assert_within_torch_error, make_input, torch_supports

import attnkernels
from attnkernels import reference

BACKENDS = cpu_backends()


def make_theta(dims: int, batch: int = 2, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    """Near-identity maps with rotation, scale and shift, some reaching outside the input."""
    gen = torch.Generator().manual_seed(seed)
    eye = torch.eye(dims, dims + 1, dtype=torch.float64)
    theta = eye + 0.3 * torch.randn((batch, dims, dims + 1), generator=gen, dtype=torch.float64)
    return theta.to(dtype)


def run_fused(backend, *args, **kwargs):
    try:
        return attnkernels.affine_grid_sample(*args, backend=backend, **kwargs)
    except RuntimeError as error:
        if backend == "triton" and "cannot serve these inputs" in str(error):
            pytest.skip(f"triton backend: {error}")
        raise


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("cpu", "reference", "cuda")])
@pytest.mark.parametrize("dims", (2, 3))
@pytest.mark.parametrize("align", (False, True))
@pytest.mark.parametrize("size", ("same", "other"))
def test_affine_grid_matches_torch(backend, dims, align, size):
    theta = make_theta(dims).requires_grad_(True)
    shape = [2, 3, *((4, 1, 6) if dims == 3 else (1, 6))] if size == "other" else [2, 3, *((5, 6, 7)[-dims:])]
    ours = attnkernels.affine_grid(theta, shape, align_corners=align, backend=backend)
    theirs = F.affine_grid(theta, shape, align_corners=align)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    grad = torch.randn(theirs.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (g_ours,) = torch.autograd.grad(ours, theta, grad)
    (g_theirs,) = torch.autograd.grad(theirs, theta, grad)
    torch.testing.assert_close(g_ours, g_theirs, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dims", (2, 3))
def test_affine_grid_gradcheck_and_double_backward(dims):
    theta = make_theta(dims, batch=1).requires_grad_(True)
    shape = [1, 1, *((2, 3, 4)[-dims:])]
    for backend in BACKENDS:
        if backend == "triton":
            continue
        fn = lambda t, be=backend: attnkernels.affine_grid(t, shape, align_corners=False, backend=be)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (theta,))
        assert torch.autograd.gradgradcheck(fn, (theta,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dims", (2, 3))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("align", (False, True))
def test_fused_equals_affine_grid_then_grid_sample(backend, dims, mode, padding, align):
    x = make_input(dims).requires_grad_(True)
    theta = make_theta(dims).requires_grad_(True)
    out_size = [2, 3, *((4, 5, 6) if dims == 3 else (5, 6))]
    ours = run_fused(backend, x, theta, out_size, mode, padding, align)
    if torch_supports(dims, mode):
        expected = F.grid_sample(x, F.affine_grid(theta, out_size, align_corners=align), mode, padding, align)
    else:
        expected = reference.grid_sample(x, reference.affine_grid(theta, out_size, align), mode, padding, align)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-9)
    grad = torch.randn(expected.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ours_grads = torch.autograd.grad(ours, (x, theta), grad)
    expected_grads = torch.autograd.grad(expected, (x, theta), grad)
    for a, b in zip(ours_grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_size_defaults_to_input_shape(backend):
    x = make_input(3)
    theta = make_theta(3)
    out = run_fused(backend, x, theta, align_corners=False)
    expected = F.grid_sample(x, F.affine_grid(theta, x.shape, align_corners=False), align_corners=False)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("dims", (2, 3))
def test_fused_low_precision_within_twice_torch(backend, dtype, dims):
    x64 = (make_input(dims, channels=4, spatial=(6, 9, 10) if dims == 3 else (12, 13)) * 4).to(dtype).double()
    theta64 = make_theta(dims).to(dtype).double()
    size = list(x64.shape)

    def torch_path(x, t):
        return F.grid_sample(x, F.affine_grid(t, size, align_corners=False), align_corners=False)

    def grads(fn, x, t):
        x = x.detach().requires_grad_(True)
        t = t.detach().requires_grad_(True)
        out = fn(x, t)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(out.dtype)
        return (out, *torch.autograd.grad(out, (x, t), g))

    truth = grads(torch_path, x64, theta64)
    theirs = grads(torch_path, x64.to(dtype), theta64.to(dtype))
    ours = grads(lambda x, t: run_fused(backend, x, t, size, align_corners=False), x64.to(dtype),
                 theta64.to(dtype))
    for name, factor, a, b, t in zip(("output", "grad_input", "grad_theta"), (2, 3, 3), ours, theirs, truth,
                                     strict=True):
        assert a.dtype == dtype
        assert_within_torch_error(a, b, t, factor, f"{name} {dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_on_channels_last_and_strided_input(backend):
    x = make_input(3, channels=5)
    theta = make_theta(3)
    expected = run_fused("reference", x, theta, align_corners=True)
    for xv in (x.contiguous(memory_format=torch.channels_last_3d), torch.stack([x, x], 2)[:, :, 1],
               x.transpose(-1, -2).contiguous().transpose(-1, -2)):
        torch.testing.assert_close(run_fused(backend, xv, theta, align_corners=True), expected, rtol=0, atol=1e-12)
    # theta as a non-contiguous view
    theta_view = torch.stack([theta, theta], -1)[..., 0]
    torch.testing.assert_close(run_fused(backend, x, theta_view, align_corners=True), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_empty_batch_and_channels(backend):
    for batch, channels in ((0, 3), (2, 0)):
        x = make_input(2, batch=batch, channels=channels).requires_grad_(True)
        theta = make_theta(2, batch=batch).requires_grad_(True)
        out = run_fused(backend, x, theta, [batch, channels, 4, 5], align_corners=False)
        assert out.shape == (batch, channels, 4, 5)
        gx, gt = torch.autograd.grad(out.sum(), (x, theta), allow_unused=True)
        assert gx is None or gx.shape == x.shape
        assert gt is None or (gt.shape == theta.shape and not gt.abs().sum().item())
