"""Checks only the hand-written CUDA sampling kernels (backend="cuda") have: lane groups, atomics and the
deterministic mode, 64-bit indexing, the direct ops, and the CUDA affine_grid and fused sampler.

The checks every backend shares (float64, low precision, layouts, empty and non-finite inputs, random
shapes) are written once in tests/test_grid_sample.py and tests/test_affine.py for every (device, backend)
pair. Every test here
needs a GPU and an extension built with the CUDA sources (skipped otherwise). The CUDA
kernels follow the attnkernels CPU backend exactly, including its treatment of non-finite grid values,
which is torch's CPU behaviour (torch's own CUDA kernels treat NaN differently from its CPU kernels).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from backends import forward_and_grads
from sampling_cases import (
    LOW_PRECISION,
    MODES,
    PADDINGS,
    assert_within_torch_error,
    make_grid,
    make_input,
    make_theta,
    max_error,
    torch_supports,
)

import attnkernels
from attnkernels import _extension

pytestmark = pytest.mark.cuda

DEVICE = "cuda"


@pytest.fixture(autouse=True)
def _needs_cuda_kernels():
    if torch.cuda.is_available() and not _extension.has_kernel("grid_sample", "CUDA"):
        pytest.fail("a GPU is present but attnkernels._C has no CUDA kernels: build with FORCE_CUDA=1 "
                    "(CUDA_HOME=/usr/local/cuda pip install --no-build-isolation -e .)")


def cuda(t: torch.Tensor) -> torch.Tensor:
    return t.to(DEVICE)


def ours(input, grid, mode, padding, align):
    return attnkernels.grid_sample(input, grid, mode, padding, align, backend="cuda")


def random_theta(dims: int, batch: int, dtype=torch.float64, seed=0) -> torch.Tensor:
    return make_theta(dims, batch, dtype, spread=0.35, seed=seed)


def torch_affine_sample(input, theta, size, mode, padding, align):
    return F.grid_sample(input, F.affine_grid(theta, size, align), mode, padding, align)


# ----------------------------------------------------------------------------- grid_sample


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_tricubic_low_precision(dtype):
    """5-D bicubic has no torch counterpart: the error against float64 stays at the dtype's rounding level."""
    x64 = cuda(make_input(3, channels=8, spatial=(6, 7, 8)))
    g64 = cuda(make_grid(3, out=(3, 4, 5)))
    x64, g64 = x64.to(dtype).double(), g64.to(dtype).double()
    truth = forward_and_grads(lambda a, b: ours(a, b, "bicubic", "reflection", False), x64, g64)
    mine = forward_and_grads(lambda a, b: ours(a, b, "bicubic", "reflection", False), x64.to(dtype), g64.to(dtype))
    # Rounding to the dtype (a few eps) plus fp32 accumulation over 8 channels x 64 taps.
    allowed = 10 * torch.finfo(dtype).eps + 1e-5
    for name, a, t in zip(("output", "grad_input", "grad_grid"), mine, truth, strict=True):
        scale = max(1.0, t.abs().max().item())
        assert max_error(a, t) <= allowed * scale, name


@pytest.mark.parametrize("channels", (1, 2, 3, 5, 16, 32, 33, 70))
@pytest.mark.parametrize("dims", (2, 3))
@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
def test_channel_counts_and_layouts(channels, dims, layout):
    """Every lane-group width (1..32 channels per point) and several channel chunks, on both kernels."""
    x = cuda(make_input(dims, channels=channels, dtype=torch.float32))
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last if dims == 2 else torch.channels_last_3d)
    g = cuda(make_grid(dims, dtype=torch.float32, out=(5, 7, 9) if dims == 3 else (37, 41)))
    for mode in MODES:
        if not torch_supports(dims, mode):
            continue
        mine = forward_and_grads(lambda a, b, m=mode: ours(a, b, m, "zeros", False), x, g)
        theirs = forward_and_grads(lambda a, b, m=mode: F.grid_sample(a, b, m, "zeros", False), x, g)
        for name, a, b in zip(("output", "grad_input", "grad_grid"), mine, theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m, n=name, md=mode: f"{md} {n}: {m}")


@pytest.mark.parametrize("dims", (2, 3))
def test_same_results_as_the_cpu_backend(dims):
    """Both compiled backends give the same values (float64), whatever the device."""
    x, g = make_input(dims, channels=6), make_grid(dims)
    for mode in MODES:
        for padding in PADDINGS:
            cpu = forward_and_grads(
                lambda a, b, m=mode, p=padding: attnkernels.grid_sample(a, b, m, p, True, backend="cpu"), x, g)
            gpu = forward_and_grads(lambda a, b, m=mode, p=padding: ours(a, b, m, p, True), cuda(x), cuda(g))
            for a, b in zip(gpu, cpu, strict=True):
                torch.testing.assert_close(a.cpu(), b, rtol=0, atol=1e-10)


def contended_case(dims, dtype=torch.float32, channels=24):
    """A strongly upsampling grid: many points share each input tap (the worst case for atomics)."""
    x = cuda(make_input(dims, dtype=dtype, batch=2, channels=channels, spatial=(3, 4, 5) if dims == 3 else (4, 5)))
    g = cuda(make_grid(dims, dtype=dtype, batch=2, out=(9, 20, 24) if dims == 3 else (60, 70), spread=1.1))
    return x, g


@pytest.mark.parametrize("dims", (2, 3))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
def test_deterministic_backward_is_bitwise_reproducible(dims, mode, layout):
    x, g = contended_case(dims)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last if dims == 2 else torch.channels_last_3d)
    grad_out = torch.randn((2, x.shape[1], *g.shape[1:-1]), device=DEVICE)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(3):
            runs.append(torch.ops.attnkernels.grid_sample_backward(grad_out, x, g, MODES.index(mode), 0, False,
                                                                   [True, True]))
    finally:
        torch.use_deterministic_algorithms(before)
    for grad_input, grad_grid in runs[1:]:
        assert torch.equal(grad_input, runs[0][0])
        assert torch.equal(grad_grid, runs[0][1])
    atomic = torch.ops.attnkernels.grid_sample_backward(grad_out, x, g, MODES.index(mode), 0, False, [True, True])
    torch.testing.assert_close(runs[0][0], atomic[0], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(runs[0][1], atomic[1], rtol=0, atol=0)  # the grid gradient never uses atomics
    assert runs[0][0].is_contiguous(memory_format=torch.channels_last if dims == 2 else torch.channels_last_3d) == (
        layout == "channels_last")


@pytest.mark.parametrize("dims", (2, 3))
def test_contended_backward_matches_torch(dims):
    x, g = contended_case(dims, dtype=torch.float64)
    for mode in ("bilinear", "nearest"):
        mine = forward_and_grads(lambda a, b, m=mode: ours(a, b, m, "border", True), x, g)
        theirs = forward_and_grads(lambda a, b, m=mode: F.grid_sample(a, b, m, "border", True), x, g)
        for a, b in zip(mine, theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-9)


def test_64_bit_indexing_path():
    """An input whose single batch item spans more than 2**31 elements takes the int64 kernels."""
    try:
        storage = torch.zeros(2**31 + 64, dtype=torch.float16, device=DEVICE)
    except torch.OutOfMemoryError:
        pytest.skip("not enough GPU memory for a 4 GiB input")
    channel_stride = 2**31 - 16
    x = storage.as_strided((1, 2, 4, 4), (0, channel_stride, 4, 1))
    with torch.no_grad():
        x[0, 0].copy_(torch.arange(16, device=DEVICE, dtype=torch.float16).view(4, 4))
        x[0, 1].copy_(-torch.arange(16, device=DEVICE, dtype=torch.float16).view(4, 4))
    g = cuda(make_grid(2, dtype=torch.float16, batch=1, out=(3, 5)))
    dense = x.contiguous().requires_grad_(True)
    xv = x.detach().requires_grad_(True)
    out = ours(xv, g, "bilinear", "zeros", False)
    torch.testing.assert_close(out, F.grid_sample(dense, g, "bilinear", "zeros", False), rtol=1e-3, atol=1e-3)
    (grad,) = torch.autograd.grad(out.float().sum(), xv)
    (expected,) = torch.autograd.grad(F.grid_sample(dense, g, "bilinear", "zeros", False).float().sum(), dense)
    torch.testing.assert_close(grad, expected, rtol=1e-3, atol=1e-3)
    del storage, x, xv


def test_gradcheck_and_gradgradcheck():
    for dims in (2, 3):
        x = cuda(make_input(dims, batch=1, channels=2, spatial=(3, 4, 3) if dims == 3 else (4, 5)))
        g = cuda(make_grid(dims, batch=1, out=(2, 2, 3) if dims == 3 else (3, 2), spread=0.9))
        for mode in ("bilinear", "bicubic"):
            def fn(a, b, m=mode):
                return ours(a, b, m, "reflection", False)
            inputs = (x.requires_grad_(True), g.requires_grad_(True))
            assert torch.autograd.gradcheck(fn, inputs, atol=1e-6)
            assert torch.autograd.gradgradcheck(fn, inputs, atol=1e-6)


def test_opcheck():
    for dims in (2, 3):
        x = cuda(make_input(dims, dtype=torch.float32)).requires_grad_(True)
        g = cuda(make_grid(dims, dtype=torch.float32)).requires_grad_(True)
        torch.library.opcheck(torch.ops.attnkernels.grid_sample.default, (x, g, 0, 2, False))
        go = torch.randn((2, 3, *g.shape[1:-1]), device=DEVICE)
        torch.library.opcheck(torch.ops.attnkernels.grid_sample_backward.default,
                              (go, x.detach(), g.detach(), 2, 1, True, [True, True]))
        torch.library.opcheck(torch.ops.attnkernels.grid_sample_backward.default,
                              (go, x.detach(), g.detach(), 0, 0, True, [True, False]))


def test_torch_compile_fullgraph():
    x = cuda(make_input(3, dtype=torch.float32)).requires_grad_(True)
    g = cuda(make_grid(3, dtype=torch.float32)).requires_grad_(True)

    def fn(a, b):
        return attnkernels.grid_sample(a, b, "bilinear", "zeros", False).square().sum()

    compiled = torch.compile(fn, fullgraph=True)
    torch.testing.assert_close(compiled(x, g), fn(x, g))
    grads = torch.autograd.grad(compiled(x, g), (x, g))
    expected = torch.autograd.grad(fn(x, g), (x, g))
    for a, b in zip(grads, expected, strict=True):
        torch.testing.assert_close(a, b)


def test_errors_name_the_argument():
    x = cuda(make_input(2, dtype=torch.float32))
    g = make_grid(2, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="grid"):
        torch.ops.attnkernels.grid_sample(x, g, 0, 0, False)  # grid on the CPU
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.attnkernels.grid_sample(x, cuda(g).double(), 0, 0, False)
    with pytest.raises(RuntimeError, match="mode"):
        torch.ops.attnkernels.grid_sample(x, cuda(g), 5, 0, False)
    go = torch.randn((2, 3, 4, 5))
    with pytest.raises(RuntimeError, match="grad_output"):
        torch.ops.attnkernels.grid_sample_backward(go, x, cuda(g), 0, 0, False, [True, True])


# ----------------------------------------------------------------------------- affine_grid


@pytest.mark.parametrize("dims", (2, 3))
@pytest.mark.parametrize("align", (False, True))
def test_affine_grid_matches_torch(dims, align):
    size = (3, 2, 4, 5, 6) if dims == 3 else (3, 2, 5, 7)
    theta = cuda(random_theta(dims, 3))
    mine = forward_and_grads(lambda t: attnkernels.affine_grid(t, size, align, backend="cuda"), theta)
    theirs = forward_and_grads(lambda t: F.affine_grid(t, size, align), theta)
    for a, b in zip(mine, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    for dtype in LOW_PRECISION:
        t = theta.to(dtype)
        torch.testing.assert_close(attnkernels.affine_grid(t, size, align, backend="cuda").double(),
                                   F.affine_grid(t.double(), size, align), rtol=0, atol=4 * torch.finfo(dtype).eps)
    assert torch.autograd.gradcheck(lambda t: attnkernels.affine_grid(t, size, align, backend="cuda"),
                                    (theta.requires_grad_(True),))
    torch.library.opcheck(torch.ops.attnkernels.affine_grid.default, (theta, list(size), align))


def test_affine_grid_backward_large_is_accurate():
    """Many tiles of partial sums: the theta gradient stays accurate in float32 (reduced in double)."""
    size = (2, 1, 33, 300, 301)
    theta = cuda(random_theta(3, 2, dtype=torch.float32))
    grad = torch.randn((2, 33, 300, 301, 3), device=DEVICE)
    mine = torch.ops.attnkernels.affine_grid_backward(grad, list(size), False)
    with torch.enable_grad():
        t64 = theta.double().requires_grad_(True)
        (expected,) = torch.autograd.grad(F.affine_grid(t64, size, False), t64, grad.double())
    torch.testing.assert_close(mine.double(), expected, rtol=1e-5, atol=1e-3)
    again = torch.ops.attnkernels.affine_grid_backward(grad, list(size), False)
    assert torch.equal(mine, again)


# ----------------------------------------------------------------------------- affine_grid_sample


def fused(input, theta, size, mode, padding, align):
    return attnkernels.affine_grid_sample(input, theta, size, mode, padding, align, backend="cuda")


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("dims", (2, 3))
@pytest.mark.parametrize("mode", ("bilinear", "bicubic"))
def test_affine_grid_sample_low_precision(dtype, dims, mode):
    # Not nearest: the fused kernel computes coordinates in fp32 from theta, torch rounds its grid to the
    # dtype, so a point near a pixel boundary may round to different pixels (both correct).
    if not torch_supports(dims, mode):
        pytest.skip("torch has no 5-D bicubic")
    x64 = cuda(make_input(dims, channels=20, spatial=(7, 8, 9) if dims == 3 else (15, 16))) * 4
    size = (2, 20, 6, 7, 8) if dims == 3 else (2, 20, 13, 14)
    theta64 = cuda(random_theta(dims, 2))
    x64, theta64 = x64.to(dtype).double(), theta64.to(dtype).double()
    truth = forward_and_grads(lambda a, t: torch_affine_sample(a, t, size, mode, "zeros", False), x64, theta64)
    x, theta = x64.to(dtype), theta64.to(dtype)
    mine = forward_and_grads(lambda a, t: fused(a, t, size, mode, "zeros", False), x, theta)
    theirs = forward_and_grads(lambda a, t: torch_affine_sample(a, t, size, mode, "zeros", False), x, theta)
    for name, factor, a, b, t in zip(("output", "grad_input", "grad_theta"), (2, 3, 3), mine, theirs, truth,
                                     strict=True):
        assert_within_torch_error(a, b, t, factor, f"{name} {dtype}")


@pytest.mark.parametrize("dims", (2, 3))
def test_affine_grid_sample_deterministic_and_layouts(dims):
    x = cuda(make_input(dims, channels=24, dtype=torch.float32, spatial=(4, 5, 6) if dims == 3 else (6, 7)))
    fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
    size = (2, 24, 10, 21, 22) if dims == 3 else (2, 24, 61, 67)
    theta = cuda(random_theta(dims, 2, dtype=torch.float32))
    grad_out = torch.randn(size, device=DEVICE)
    for xv in (x, x.contiguous(memory_format=fmt)):
        before = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            runs = [torch.ops.attnkernels.affine_grid_sample_backward(grad_out, xv, theta, list(size), 0, 0, False,
                                                                      [True, True]) for _ in range(3)]
        finally:
            torch.use_deterministic_algorithms(before)
        for grad_input, grad_theta in runs[1:]:
            assert torch.equal(grad_input, runs[0][0]) and torch.equal(grad_theta, runs[0][1])
        assert runs[0][0].is_contiguous(memory_format=fmt) == (xv is not x)
        atomic = torch.ops.attnkernels.affine_grid_sample_backward(grad_out, xv, theta, list(size), 0, 0, False,
                                                                   [True, True])
        torch.testing.assert_close(runs[0][0], atomic[0], rtol=1e-4, atol=1e-3)
        assert torch.equal(runs[0][1], atomic[1])  # theta's gradient is always reduced without atomics


@pytest.mark.parametrize("dims", (2, 3))
def test_affine_grid_sample_empty_gradcheck_opcheck_compile(dims):
    size = [0, 3, 2, 3, 4] if dims == 3 else [0, 3, 3, 4]
    x = cuda(make_input(dims, batch=0)).requires_grad_(True)
    theta = cuda(random_theta(dims, 0)).requires_grad_(True)
    out = fused(x, theta, size, "bilinear", "zeros", False)
    assert out.shape == tuple(size)
    gi, gt = torch.autograd.grad(out.sum(), (x, theta), allow_unused=True)
    assert gi is None or gi.shape == x.shape
    assert gt is None or gt.shape == theta.shape

    x = cuda(make_input(dims, batch=1, channels=2, spatial=(3, 3, 4) if dims == 3 else (4, 5)))
    theta = cuda(random_theta(dims, 1))
    size = [1, 2, 2, 3, 2] if dims == 3 else [1, 2, 3, 4]
    inputs = (x.requires_grad_(True), theta.requires_grad_(True))
    assert torch.autograd.gradcheck(lambda a, t: fused(a, t, size, "bilinear", "border", True), inputs, atol=1e-6)
    torch.library.opcheck(torch.ops.attnkernels.affine_grid_sample.default, (x, theta, size, 0, 1, True))
    go = torch.randn(size, dtype=torch.float64, device=DEVICE)
    torch.library.opcheck(torch.ops.attnkernels.affine_grid_sample_backward.default,
                          (go, x.detach(), theta.detach(), size, 2, 2, False, [True, True]))

    def fn(a, t):
        return attnkernels.affine_grid_sample(a, t, size, "bilinear", "zeros", False).sum()

    compiled = torch.compile(fn, fullgraph=True)
    torch.testing.assert_close(compiled(*inputs), fn(*inputs))
