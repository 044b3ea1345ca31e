"""affine_grid and the fused affine_grid_sample against torch and the reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from backends import ON_CPU, device_backends, forward_and_grads, serve_or_skip
from conftest import cpu_backends
from hypothesis import given, settings
from hypothesis import strategies as st
from sampling_cases import (
    LOW_PRECISION,
    MODES,
    PADDINGS,
    assert_within_torch_error,
    float_bits,
    make_input,
    make_theta,
    pixel_quad_cases,
    pixel_quad_input,
    random_case,
    torch_supports,
)

import attnkernels
from attnkernels import reference

BACKENDS = cpu_backends()
# The fused sampler is checked on every backend that has it, Triton on CUDA tensors included.
FUSED_PAIRS = device_backends(*ON_CPU, ("cuda", "cuda"), ("cuda", "triton"))


def run_fused(backend, *args, **kwargs):
    """affine_grid_sample through attnkernels; skips when the triton backend says it cannot serve the inputs."""
    return serve_or_skip(backend, attnkernels.affine_grid_sample, *args, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
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
        fn = lambda t, be=backend: attnkernels.affine_grid(t, shape, align_corners=False, backend=be)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (theta,))
        assert torch.autograd.gradgradcheck(fn, (theta,))


@pytest.mark.parametrize(("device", "backend"), FUSED_PAIRS)
@pytest.mark.parametrize("dims", (2, 3))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("align", (False, True))
def test_fused_equals_affine_grid_then_grid_sample(device, backend, dims, mode, padding, align):
    """float64 against torch's two steps (the reference's for tricubic) and the reference's fused sampler."""
    x = make_input(dims).to(device)
    theta = make_theta(dims).to(device)
    out_size = [2, 3, *((4, 5, 6) if dims == 3 else (5, 6))]
    ours = forward_and_grads(lambda a, t: run_fused(backend, a, t, out_size, mode, padding, align), x, theta)
    if torch_supports(dims, mode):
        def two_steps(a, t):
            return F.grid_sample(a, F.affine_grid(t, out_size, align_corners=align), mode, padding, align)
    else:
        def two_steps(a, t):
            return reference.grid_sample(a, reference.affine_grid(t, out_size, align), mode, padding, align)
    fused_oracle = forward_and_grads(
        lambda a, t: reference.affine_grid_sample(a, t, out_size, mode, padding, align), x, theta)
    for expected in (forward_and_grads(two_steps, x, theta), fused_oracle):
        for name, a, b, atol in zip(("output", "grad_input", "grad_theta"), ours, expected, (1e-9, 1e-8, 1e-8),
                                    strict=True):
            assert a.device.type == device
            torch.testing.assert_close(a, b, rtol=0, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_size_defaults_to_input_shape(backend):
    x = make_input(3)
    theta = make_theta(3)
    out = run_fused(backend, x, theta, align_corners=False)
    expected = F.grid_sample(x, F.affine_grid(theta, x.shape, align_corners=False), align_corners=False)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize(("device", "backend"), [p for p in FUSED_PAIRS if p.values[1] != "reference"])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("dims", (2, 3))
@pytest.mark.parametrize("padding", ("zeros", "border"))
def test_fused_low_precision_within_twice_torch(device, backend, dtype, dims, padding):
    x64 = (make_input(dims, channels=4, spatial=(6, 9, 10) if dims == 3 else (12, 13)) * 4).to(dtype).double()
    x64 = x64.to(device)
    theta64 = make_theta(dims).to(dtype).double().to(device)
    size = list(x64.shape)

    def torch_path(x, t):
        return F.grid_sample(x, F.affine_grid(t, size, align_corners=False), padding_mode=padding,
                             align_corners=False)

    truth = forward_and_grads(torch_path, x64, theta64, seed=5)
    theirs = forward_and_grads(torch_path, x64.to(dtype), theta64.to(dtype), seed=5)
    ours = forward_and_grads(lambda x, t: run_fused(backend, x, t, size, padding_mode=padding, align_corners=False),
                             x64.to(dtype), theta64.to(dtype), seed=5)
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


def test_reference_fused_theta_gradient_in_float32_tracks_float64():
    # theta's gradient sums over every output point, and the bilinear gradient jumps by a whole step
    # where a coordinate crosses a pixel boundary; a float32 grid product rounds some coordinates across.
    # The reference rounds a float64 grid once: for this near-identity map on 256 x 256 (the bench's
    # 2-D case), a float32 grid gave 11 times the error (3.7e-5 of the gradient's size, against 3e-6).
    generator = torch.Generator().manual_seed(4)
    theta = torch.eye(2, 3).expand(1, 2, 3) + 0.15 * torch.randn(1, 2, 3, generator=generator)
    x = torch.randn(1, 32, 256, 256, generator=generator)
    grad_out = torch.randn(1, 32, 256, 256, generator=generator)

    def theta_grad(dtype):
        t = theta.to(dtype).clone().requires_grad_(True)
        out = reference.affine_grid_sample(x.to(dtype), t, list(x.shape), align_corners=False)
        (grad,) = torch.autograd.grad(out, t, grad_out.to(dtype))
        return grad.double()

    exact = theta_grad(torch.float64)
    assert (theta_grad(torch.float32) - exact).abs().max() <= 1e-5 * exact.abs().max()


# The CPU fused kernel samples bilinear zeros/border with finite, moderate theta in tiles of 16 (fp32) or
# 8 (fp64) points of one output row; the tests below reach its row tails, both dtypes of lane, both
# paddings, and the inputs it hands back to the general kernel.


def _fused_and_torch_grads(backend, x, theta, size, mode, padding, align):
    def run(fn):
        xs = x.detach().requires_grad_(True)
        ts = theta.detach().requires_grad_(True)
        out = fn(xs, ts)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(out.dtype)
        return (out, *torch.autograd.grad(out, (xs, ts), g))

    ours = run(lambda a, t: run_fused(backend, a, t, size, mode, padding, align))
    theirs = run(lambda a, t: F.grid_sample(a, F.affine_grid(t, size, align_corners=align), mode, padding, align))
    return ours, theirs


# up to 8 channels: the input gradient is scattered planar up to 4 channels, channels-last above
ROW_CASES = random_case(max_batch=2, max_channels=8, max_in=9, out_ranges=((1, 3), (1, 4), (1, 40)),
                        modes=("bilinear",), paddings=("zeros", "border"))


@settings(max_examples=30, deadline=None)
@given(case=ROW_CASES, scale=st.sampled_from((0.05, 0.3, 1.0, 3.0)))
def test_fused_bilinear_random_rows_match_torch(case, scale):
    """Rows of any width (1 to 40: whole tiles, tails, less than a tile) and maps from strong zoom-in
    (many points per pixel, so one tile's lanes share taps) to zoom-out far past the input."""
    dims, batch, padding, align = case.dims, case.batch, case.padding, case.align
    x = case.input
    gen = torch.Generator().manual_seed(case.seed + 1)
    theta = torch.eye(dims, dims + 1, dtype=torch.float64) * scale
    theta = theta + 0.2 * torch.randn((batch, dims, dims + 1), generator=gen, dtype=torch.float64)
    size = [batch, case.channels, *case.out_size]
    for backend in [b for b in BACKENDS if b in ("cpu", "reference")]:
        ours, theirs = _fused_and_torch_grads(backend, x, theta, size, "bilinear", padding, align)
        for name, a, b in zip(("output", "grad_input", "grad_theta"), ours, theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-9, msg=lambda m, n=name, be=backend: f"{be} {n}: {m}")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("padding", ("zeros", "border"))
@pytest.mark.parametrize("dims", (2, 3))
# 3 and 6: the cpu kernel's planar and channels-last gradient scatter; 8 and 9: either side of the
# channel count above which its forward leaves the row path for the channels-last sampler.
@pytest.mark.parametrize("channels", (3, 6, 8, 9))
def test_fused_fp32_rows_within_twice_torch(backend, padding, dims, channels):
    """fp32 lanes (16 to a tile) on rows of 37 points (two whole tiles and a tail), against float64
    by the FlashAttention rule, as the low-precision test above does on shorter rows."""
    x64 = (make_input(dims, channels=channels, spatial=(5, 9, 23) if dims == 3 else (9, 23)) * 2).float().double()
    theta64 = make_theta(dims).float().double()
    size = [2, channels, *((4, 5, 37) if dims == 3 else (5, 37))]
    truth = _fused_and_torch_grads("reference", x64, theta64, size, "bilinear", padding, False)[1]
    ours, theirs = _fused_and_torch_grads(backend, x64.float(), theta64.float(), size, "bilinear", padding, False)
    for name, factor, a, b, t in zip(("output", "grad_input", "grad_theta"), (2, 3, 3), ours, theirs, truth,
                                     strict=True):
        assert a.dtype == torch.float32
        assert_within_torch_error(a, b, t, factor, f"{name} {padding} {dims}-D")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("cpu", "reference")])
@pytest.mark.parametrize("dims", (2, 3))
@pytest.mark.parametrize("channels", (4, 6))
def test_fused_gradient_keeps_channels_last_layout(backend, dims, channels):
    x = make_input(dims, channels=channels).contiguous(
        memory_format=torch.channels_last if dims == 2 else torch.channels_last_3d).requires_grad_(True)
    theta = make_theta(dims).requires_grad_(True)
    out = run_fused(backend, x, theta, align_corners=False)
    grad_input, _ = torch.autograd.grad(out, (x, theta), torch.ones_like(out))
    expected = torch.autograd.grad(
        F.grid_sample(x, F.affine_grid(theta, x.shape, align_corners=False), align_corners=False), x,
        torch.ones_like(out))[0]
    torch.testing.assert_close(grad_input, expected, rtol=0, atol=1e-9)
    if backend == "cpu":
        assert grad_input.is_contiguous(memory_format=torch.channels_last if dims == 2 else torch.channels_last_3d)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("cpu", "reference")])
@pytest.mark.parametrize("dims", (2, 3))
@pytest.mark.parametrize("padding", ("zeros", "border"))
@pytest.mark.parametrize("bad", ("nan", "inf", "huge"))
def test_fused_non_finite_and_huge_theta_match_torch(backend, dims, padding, bad):
    """theta the row path cannot take (non-finite, or coordinates beyond int32) goes to the general
    kernel, which follows torch's CPU kernels: same output, NaN where torch has NaN. (An infinite
    theta meets the base grid's middle column, which torch's linspace rounds to 5.6e-17, not 0:
    Inf there, not NaN, and ours must round it the same.)"""
    x = make_input(dims, channels=2)
    theta = make_theta(dims)
    value = {"nan": float("nan"), "inf": float("inf"), "huge": 3e9}[bad]
    theta[0, 0, 0] = value
    theta[1, dims - 1, dims] = -value
    ours = run_fused(backend, x, theta, padding_mode=padding, align_corners=False)
    theirs = F.grid_sample(x, F.affine_grid(theta, x.shape, align_corners=False), padding_mode=padding,
                           align_corners=False)
    if backend == "reference":
        # The reference promises the math, not torch's NaN rules or its rounding of a 3e9 shift.
        assert ours.shape == theirs.shape
        if bad == "huge":
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
        return
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-9, equal_nan=True)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("cpu", "cuda")])
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=str)
@pytest.mark.parametrize("align", (False, True))
def test_affine_grid_base_coordinates_equal_torch_bitwise(backend, dtype, align):
    """The identity map returns the base grid itself: equal to torch's bit for bit for every axis length
    up to 130 (torch's linspace is symmetric and rounds with fused multiply-adds)."""
    for n in range(1, 131):
        theta = torch.eye(2, 3, dtype=dtype)[None]
        ours = attnkernels.affine_grid(theta, [1, 1, 1, n], align_corners=align, backend=backend)
        torch.testing.assert_close(ours, F.affine_grid(theta, [1, 1, 1, n], align_corners=align), rtol=0, atol=0,
                                   msg=f"n={n}")


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the extension is not built")
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("dims", (2, 3))
@pytest.mark.parametrize("padding", ("zeros", "border"))
@pytest.mark.parametrize("align", (False, True))
@pytest.mark.parametrize("channels", (3, 4, 5))
def test_fused_row_path_forward_equals_grid_then_sample_bitwise(dtype, dims, padding, align, channels):
    """The CPU fused kernel's vectorised row path rounds exactly as our affine_grid followed by our
    grid_sample does: bit for bit, tails included (fp32 with 3 or 4 channels: both read pixel quads;
    otherwise the general, channel-vectorised path)."""
    size = [2, channels, 5, 9, 37] if dims == 3 else [2, channels, 11, 37]
    x = make_input(dims, channels=size[1], spatial=(7, 8, 9) if dims == 3 else (8, 9)).to(dtype)
    theta = make_theta(dims).to(dtype)
    fused = attnkernels.affine_grid_sample(x, theta, size, padding_mode=padding, align_corners=align, backend="cpu")
    grid = attnkernels.affine_grid(theta, size, align_corners=align, backend="cpu")
    two_step = attnkernels.grid_sample(x, grid, padding_mode=padding, align_corners=align, backend="cpu")
    assert torch.equal(fused, two_step)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the extension is not built")
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("dims", (2, 3))
@pytest.mark.parametrize("channels", (3, 8))
@pytest.mark.parametrize("channels_last", (False, True), ids=("planar", "channels_last"))
def test_fused_16bit_is_the_float32_result_rounded(dtype, dims, channels, channels_last):
    """16-bit inputs compute in float32 and round once: the CPU kernel's output is its float32 output on
    the widened inputs, rounded, bit for bit (the vector variants run exactly that), and the gradients
    keep the input's layout."""
    size = [2, channels, 5, 9, 37] if dims == 3 else [2, channels, 11, 37]
    x = (make_input(dims, channels=channels, spatial=(7, 8, 9) if dims == 3 else (8, 9)) * 4).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last if dims == 2 else torch.channels_last_3d)
    theta = make_theta(dims).to(dtype)
    x16, theta16 = x.clone().requires_grad_(), theta.clone().requires_grad_()
    x32, theta32 = x.float().requires_grad_(), theta.float().requires_grad_()
    out16 = attnkernels.affine_grid_sample(x16, theta16, size, align_corners=False, backend="cpu")
    out32 = attnkernels.affine_grid_sample(x32, theta32, size, align_corners=False, backend="cpu")
    assert out16.dtype == dtype and torch.equal(out16, out32.to(dtype))
    grad_out = make_input(dims, channels=channels, spatial=size[2:], seed=4)
    grads16 = torch.autograd.grad(out16, (x16, theta16), grad_out.to(dtype))
    grads32 = torch.autograd.grad(out32, (x32, theta32), grad_out.to(dtype).float())
    for name, mine, wide in zip(("grad_input", "grad_theta"), grads16, grads32, strict=True):
        assert mine.dtype == dtype, name
        torch.testing.assert_close(mine.float(), wide.to(dtype).float(), rtol=1e-2, atol=1e-2, msg=name)
    if channels_last:
        assert grads16[0].is_contiguous(memory_format=torch.channels_last if dims == 2 else torch.channels_last_3d)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the extension is not built")
@pixel_quad_cases
def test_fused_pixel_quads_give_each_channel_sampled_alone_bitwise(dims, padding, align, channels, spatial, threads,
                                                                   forward_quads, monkeypatch):
    """The fused kernel's row path reads fp32 inputs of 3 or 4 channels as bordered pixel quads and scatters the
    input gradient into quads (one channel gathers from the planar input): output and input gradient bit for
    bit what each channel sampled alone gives, the theta gradient (summed per lane in float64) their sum to
    rounding; maps reaching past every edge, infinite and NaN input values, one-pixel axes, 1 and 3 threads."""
    monkeypatch.setenv("ATTNKERNELS_PIXEL_QUADS", forward_quads)
    x = pixel_quad_input(dims, channels, spatial)
    theta = make_theta(dims, spread=0.6).float()
    size = [2, channels, *((3, 7, 40) if dims == 3 else (11, 40))]
    go = torch.randn(size, generator=torch.Generator().manual_seed(5))

    def sample(a, gradient):
        a, t = a.detach().requires_grad_(True), theta.detach().requires_grad_(True)
        out = attnkernels.affine_grid_sample(a, t, [size[0], a.shape[1], *size[2:]], padding_mode=padding,
                                             align_corners=align, backend="cpu")
        return (out, *torch.autograd.grad(out, (a, t), gradient))

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        together = sample(x, go)
        alone = [sample(x[:, c:c + 1], go[:, c:c + 1]) for c in range(channels)]
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(float_bits(together[0]), float_bits(torch.cat([r[0] for r in alone], 1)))
    assert torch.equal(float_bits(together[1]), float_bits(torch.cat([r[1] for r in alone], 1)))
    grad_theta = sum(r[2].double() for r in alone)
    torch.testing.assert_close(together[2].double(), grad_theta, rtol=1e-5, atol=1e-4, equal_nan=True)
    assert together[0].isnan().any() and together[0].isfinite().any()  # the special values reached the output
