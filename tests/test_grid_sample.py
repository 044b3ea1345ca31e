"""grid_sample against torch and the reference, written once and run for every (device, backend) pair."""

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
    all_cases,
    assert_within_torch_error,
    case_id,
    float_bits,
    make_grid,
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
PAIRS = device_backends()
CPU_PAIRS = device_backends(*ON_CPU)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
CASES = all_cases()


def run(backend, input, grid, mode, padding, align):
    """grid_sample through attnkernels; skips when the triton backend says it cannot serve the inputs."""
    return serve_or_skip(backend, attnkernels.grid_sample, input, grid, mode, padding, align)


@pytest.mark.parametrize(("device", "backend"), PAIRS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_float64_matches_torch_and_reference(device, backend, case):
    dims, mode, padding, align = case
    x, g = make_input(dims).to(device), make_grid(dims).to(device)
    ours = forward_and_grads(lambda a, b: run(backend, a, b, mode, padding, align), x, g)
    oracle = forward_and_grads(lambda a, b: reference.grid_sample(a, b, mode, padding, align), x, g)
    for name, a, b in zip(("output", "grad_input", "grad_grid"), ours, oracle, strict=True):
        assert a.device.type == device
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9, msg=lambda m, n=name: f"{n} vs reference: {m}")
    if torch_supports(dims, mode):
        theirs = forward_and_grads(lambda a, b: F.grid_sample(a, b, mode, padding, align), x, g)
        for name, a, b in zip(("output", "grad_input", "grad_grid"), ours, theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-9, msg=lambda m, n=name: f"{n} vs torch: {m}")


def test_reference_matches_torch_float64():
    """The oracle itself agrees with torch wherever torch has the mode."""
    for dims, mode, padding, align in CASES:
        if not torch_supports(dims, mode):
            continue
        x, g = make_input(dims), make_grid(dims)
        options = (mode, padding, align)
        ours = forward_and_grads(lambda a, b, o=options: reference.grid_sample(a, b, *o), x, g)
        theirs = forward_and_grads(lambda a, b, o=options: F.grid_sample(a, b, *o), x, g)
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize(("device", "backend"), device_backends(exclude=("reference",)))
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("case", [c for c in CASES if c[3] is False], ids=case_id)
def test_low_precision_error_within_twice_torch(device, backend, dtype, case):
    dims, mode, padding, _ = case
    if not torch_supports(dims, mode):
        pytest.skip("torch has no 5-D bicubic to compare the error with (see test_tricubic_low_precision)")
    # On CUDA 40 channels reach past one lane group of the kernels.
    channels = 40 if device == "cuda" else 4
    x64 = make_input(dims, channels=channels, spatial=(6, 9, 10) if dims == 3 else (12, 13)).to(device) * 4
    g64 = make_grid(dims, out=(4, 6, 7) if dims == 3 else (9, 11)).to(device)
    # Truth: float64 on the inputs rounded to the low-precision dtype.
    x64, g64 = x64.to(dtype).double(), g64.to(dtype).double()
    truth = forward_and_grads(lambda a, b: F.grid_sample(a, b, mode, padding, False), x64, g64)
    x, g = x64.to(dtype), g64.to(dtype)
    ours = forward_and_grads(lambda a, b: run(backend, a, b, mode, padding, False), x, g)
    theirs = forward_and_grads(lambda a, b: F.grid_sample(a, b, mode, padding, False), x, g)
    for name, factor, a, b, t in zip(("output", "grad_input", "grad_grid"), (2, 3, 3), ours, theirs, truth,
                                     strict=True):
        assert a.dtype == dtype
        assert_within_torch_error(a, b, t, factor, f"{name} {dtype}")


@pytest.mark.skipif(not attnkernels._extension.has_extension(), reason="the compiled extension is not built")
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("dims", (2, 3))
@pytest.mark.parametrize("channels", (1, 3, 4))
@pytest.mark.parametrize("layout", ("contiguous", "channels_last", "strided"))
@pytest.mark.parametrize("padding", ("zeros", "border"))
def test_cpu_low_precision_few_channels_is_float32_rounded(dtype, dims, channels, layout, padding):
    """The CPU kernel serves 16-bit inputs of up to 4 channels (bilinear, zeros or border: an RGB image) on
    float32 copies: output and both gradients are its float32 results rounded once, in the input's layout."""
    generator = torch.Generator().manual_seed(channels * 10 + dims)
    spatial = [5, 7, 9][3 - dims:]
    x = (torch.randn(2, channels, *spatial, generator=generator) * 4).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last if dims == 2 else torch.channels_last_3d)
    elif layout == "strided":
        x = torch.stack([x, x], 2)[:, :, 1]
    grid = (torch.rand(2, *[3, 11, 19][3 - dims:], dims, generator=generator) * 2.4 - 1.2).to(dtype)
    grad_out = torch.randn(2, channels, *grid.shape[1:-1], generator=generator).to(dtype)

    def sample(a, g, go):
        a, g = a.detach().requires_grad_(True), g.detach().requires_grad_(True)
        out = attnkernels.grid_sample(a, g, "bilinear", padding, False, backend="cpu")
        return (out, *torch.autograd.grad(out, (a, g), go))

    low = sample(x, grid, grad_out)
    wide = sample(x.float(), grid.float(), grad_out.float())
    for name, a, b in zip(("output", "grad_input", "grad_grid"), low, wide, strict=True):
        assert a.dtype == dtype, name
        torch.testing.assert_close(a, b.to(dtype), rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")
    assert low[1].stride() == wide[1].stride()


@pytest.mark.parametrize(("device", "backend"), PAIRS)
@pytest.mark.parametrize("dims", (2, 3))
def test_non_contiguous_and_channels_last(device, backend, dims):
    x = make_input(dims, channels=5).to(device)
    g = make_grid(dims).to(device)
    fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
    variants = {
        "channels_last": x.contiguous(memory_format=fmt),
        "transposed": x.transpose(-1, -2).contiguous().transpose(-1, -2),
        "strided view": torch.stack([x, x], 2)[:, :, 0],
    }
    grid_strided = g.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    expected = F.grid_sample(x, g, "bilinear", "border", False)
    for name, xv in variants.items():
        xv = xv.detach().requires_grad_(True)
        out = run(backend, xv, grid_strided, "bilinear", "border", False)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")
        (grad,) = torch.autograd.grad(out.sum(), xv)
        xt = xv.detach().requires_grad_(True)
        (expected_grad,) = torch.autograd.grad(F.grid_sample(xt, g, "bilinear", "border", False).sum(), xt)
        torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-12)
    # A channels-last input gets a channels-last gradient (as torch's fp32 CPU kernel gives), a
    # contiguous one a contiguous gradient; the output is contiguous either way (one fake kernel
    # serves the CPU and CUDA kernels).
    if backend != "reference":
        for xv, channels_last in ((variants["channels_last"], True), (x, False)):
            xv = xv.detach().float().contiguous(memory_format=fmt if channels_last else torch.contiguous_format)
            xv.requires_grad_(True)
            out = run(backend, xv, g.float(), "bilinear", "zeros", False)
            if device == "cuda":
                assert out.is_contiguous()
            (grad,) = torch.autograd.grad(out.sum(), xv)
            assert grad.is_contiguous(memory_format=fmt) == channels_last
            assert grad.is_contiguous() == (not channels_last)


@pytest.mark.parametrize(("device", "backend"), PAIRS)
@pytest.mark.parametrize("dims", (2, 3))
@pytest.mark.parametrize("empty", ("batch", "channels", "points"))
def test_empty_tensors(device, backend, dims, empty):
    batch = 0 if empty == "batch" else 2
    channels = 0 if empty == "channels" else 3
    out_size = ((0, 2, 3) if dims == 3 else (0, 3)) if empty == "points" else None
    x = make_input(dims, batch=batch, channels=channels).to(device).requires_grad_(True)
    g = make_grid(dims, batch=batch, out=out_size).to(device).requires_grad_(True)
    out = run(backend, x, g, "bilinear", "zeros", False)
    expected = F.grid_sample(x, g, "bilinear", "zeros", False)
    assert out.shape == expected.shape
    grad_input, grad_grid = torch.autograd.grad(out.sum(), (x, g), allow_unused=True)
    for grad, like in ((grad_input, x), (grad_grid, g)):
        assert grad is None or (grad.shape == like.shape and not grad.abs().sum().item())


NON_FINITE = [float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 1.0, -1.0, 0.3]


def huge_reflection_is_arbitrary(device, backend, dtype, dims, padding) -> bool:
    """Whether reflecting +-1e30 has no one right answer to compare with torch's."""
    if padding != "reflection":
        return False
    if device == "cuda":
        # 4-D reflection of a huge coordinate is decided by rounding (csrc/grid_sample_math.h), and nvcc
        # contracts its multiply-subtract into an FMA: the reflected point is arbitrary on every backend.
        # In 3-D the CUDA kernels reflect fp32 exactly (as the CPU kernels do, unlike torch), and in fp64
        # nvcc's FMA in unnormalising 1e30 moves it by whole spans before the reflection (seen on an H200).
        return dims == 2 or backend == "cuda"
    # torch reflects +-1e30 by a rounded flip count; the reference, and the kernels in fp32, reflect
    # exactly (see the fp32 test of huge coordinates)
    return backend == "reference" or dtype == torch.float32


@pytest.mark.parametrize(("device", "backend"), PAIRS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("dims", (2, 3))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padding", PADDINGS)
def test_nan_and_inf_in_grid_match_torch(device, backend, dtype, dims, mode, padding):
    """Non-finite grid values give exactly torch's CPU output (torch treats 4-D and 5-D differently),
    on CUDA tensors too (torch's CUDA kernels differ); the reference, the oracle, follows the same rule."""
    if not torch_supports(dims, mode) and device == "cpu":
        pytest.skip("torch has no 5-D bicubic")
    x = make_input(dims, dtype=dtype, batch=1, channels=2)
    values = torch.tensor(NON_FINITE, dtype=dtype)
    if huge_reflection_is_arbitrary(device, backend, dtype, dims, padding):
        values = values[values.abs() != 1e30]
    # Each value in each coordinate, with the other coordinates at ordinary points.
    pts = []
    for axis in range(dims):
        for v in values:
            p = torch.full((dims,), 0.25, dtype=dtype)
            p[axis] = v
            pts.append(p)
    g = torch.stack(pts).reshape(1, *([1] * (dims - 1)), len(pts), dims)
    for align in (False, True):
        out = run(backend, x.to(device), g.to(device), mode, padding, align).cpu()
        if torch_supports(dims, mode):
            expected = F.grid_sample(x, g, mode, padding, align)
            torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6, equal_nan=True)
        if device == "cuda":  # the CPU backend's rule, tricubic included
            expected = attnkernels.grid_sample(x, g, mode, padding, align, backend="cpu")
            torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize(("device", "backend"), device_backends(exclude=("reference",)))
@pytest.mark.parametrize("dims", (2, 3))
def test_backward_with_non_finite_grid_does_not_crash(device, backend, dims):
    """torch's own backward can crash on NaN grids; ours returns, and bilinear input gradients stay finite."""
    x = make_input(dims).to(device).requires_grad_(True)
    g = make_grid(dims).to(device)
    g.view(-1)[::3] = float("nan")
    g.view(-1)[1::5] = float("inf")
    for padding in PADDINGS:
        g_leaf = g.clone().requires_grad_(True)
        out = run(backend, x, g_leaf, "bilinear", padding, False)
        grad_input, _ = torch.autograd.grad(out.nansum(), (x, g_leaf))
        if device == "cuda":
            torch.cuda.synchronize()
        assert torch.isfinite(grad_input).all(), padding


@pytest.mark.parametrize(("device", "backend"), CPU_PAIRS)
@pytest.mark.parametrize("dims", (2, 3))
@pytest.mark.parametrize("mode", ("bilinear", "nearest"))
@pytest.mark.parametrize("align", (False, True))
def test_fp32_reflection_of_huge_coordinates_is_at_least_as_right_as_torch(device, backend, dims, mode, align):
    """Coordinates of 1e7 pixels and more: torch's float flip count rounds; ours may be no further from
    the exact reflection (float64 on the same float32 grid) than torch, at worst and on average (point by
    point the float unnormalisation, whose rounding differs from torch's, decides a few points)."""
    generator = torch.Generator().manual_seed(0)
    size = (1, 1, *([3] * (dims - 2)), 4, 5)
    x = torch.arange(float(torch.Size(size).numel())).reshape(size)
    far = (torch.rand(400, generator=generator) * 2 - 1) * torch.logspace(7, 9, 400).flip(0)
    g = torch.zeros(400, dims)
    g[:, 0] = far
    g[:, 1:] = 0.3
    g = g.reshape(1, *([1] * (dims - 1)), 400, dims)
    exact = reference.grid_sample(x.double(), g.double(), mode, "reflection", align).flatten()
    theirs = (F.grid_sample(x, g, mode, "reflection", align).flatten().double() - exact).abs()
    ours = (run(backend, x, g, mode, "reflection", align).flatten().double() - exact).abs()
    assert ours.max() <= theirs.max() + 1e-3 and ours.mean() <= theirs.mean() + 1e-3, (ours.max(), theirs.max(),
                                                                                        ours.mean(), theirs.mean())


def test_nearest_rounds_half_to_even():
    x = torch.arange(5, dtype=torch.float64).reshape(1, 1, 1, 5)
    # With align_corners=True, x = -1 + 2 k / 4 lands exactly on pixel k; halfway points 0.5, 1.5, 2.5.
    pixels = torch.tensor([0.5, 1.5, 2.5, 3.5], dtype=torch.float64)
    g = torch.stack([pixels / 2 - 1, torch.zeros_like(pixels)], -1).reshape(1, 1, 4, 2)
    for backend in BACKENDS:
        out = run(backend, x, g, "nearest", "zeros", True)
        assert out.flatten().tolist() == [0.0, 2.0, 2.0, 4.0], backend


@pytest.mark.parametrize(("device", "backend"), CPU_PAIRS)
@pytest.mark.parametrize("padding", PADDINGS)
def test_tricubic_of_a_volume_constant_along_x_equals_torch_bicubic(device, backend, padding):
    """The z and y axes of tricubic: a volume constant along x is torch's bicubic over (z, y)."""
    image = make_input(2, batch=1, channels=2, spatial=(6, 7))  # (N, C, D, H)
    volume = image.unsqueeze(-1).expand(-1, -1, -1, -1, 8).contiguous()  # (N, C, D, H, W=8)
    g2 = make_grid(2, batch=1, out=(3, 5))  # x -> H, y -> D
    gen = torch.Generator().manual_seed(6)
    inner = (torch.rand((1, 3, 5, 1), generator=gen, dtype=torch.float64) * 2 - 1) * 0.2
    g3 = torch.cat([inner, g2], -1).unsqueeze(1)  # (N, 1, Ho, Wo, 3) = (x inside, y, z)
    out = run(backend, volume, g3, "bicubic", padding, False)[:, :, 0]
    torch.testing.assert_close(out, F.grid_sample(image, g2, "bicubic", padding, False), rtol=0, atol=1e-9)


@pytest.mark.parametrize(("device", "backend"), CPU_PAIRS)
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("align", (False, True))
def test_tricubic_of_a_volume_constant_along_z_equals_torch_bicubic(device, backend, padding, align):
    """With every depth slice equal, tricubic sampling is torch's bicubic sampling of one slice."""
    image = make_input(2, batch=2, channels=3, spatial=(6, 7))
    volume = image.unsqueeze(2).expand(-1, -1, 8, -1, -1).contiguous()
    g2 = make_grid(2, out=(4, 5))
    gen = torch.Generator().manual_seed(4)
    depth = (torch.rand((2, 1, 4, 5, 1), generator=gen, dtype=torch.float64) * 2 - 1) * 0.2
    g3 = torch.cat([g2.unsqueeze(1), depth], -1)  # (N, 1, Ho, Wo, 3); all 4 z taps inside the volume
    out = run(backend, volume, g3, "bicubic", padding, align)[:, :, 0]
    expected = F.grid_sample(image, g2, "bicubic", padding, align)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=25, deadline=None)
@given(data=st.data(), channels_last=st.booleans())
def test_random_shapes_match_torch(device, data, channels_last):
    """Random shapes, modes and paddings: on CPU tensors every CPU backend, on CUDA tensors the cuda
    backend (up to 40 channels: more than one lane group of its kernels)."""
    bounds = dict(max_channels=40, out_ranges=((1, 9),) * 3) if device == "cuda" else {}
    case = data.draw(random_case(**bounds))
    dims, mode, padding, align = case.dims, case.mode, case.padding, case.align
    x, g = case.input.to(device), case.grid.to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last if dims == 2 else torch.channels_last_3d)
    theirs = forward_and_grads(lambda a, b: F.grid_sample(a, b, mode, padding, align), x, g)
    for backend in BACKENDS if device == "cpu" else ["cuda"]:
        if backend == "triton" and mode == "bicubic":
            continue
        ours = forward_and_grads(lambda a, b, be=backend: run(be, a, b, mode, padding, align), x, g)
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_default_backend_is_the_compiled_kernel_of_the_device(device):
    x, g = make_input(2, dtype=torch.float32).to(device), make_grid(2, dtype=torch.float32).to(device)
    expected = device if device in attnkernels.available_backends() else "reference"
    # The chosen backend gives bitwise the same result as asking for it explicitly.
    torch.testing.assert_close(attnkernels.grid_sample(x, g, align_corners=False),
                               attnkernels.grid_sample(x, g, align_corners=False, backend=expected), rtol=0, atol=0)


def test_align_corners_none_means_false_with_torch_warning():
    x, g = make_input(2), make_grid(2)
    with pytest.warns(UserWarning, match="align_corners"):
        out = attnkernels.grid_sample(x, g)
    torch.testing.assert_close(out, F.grid_sample(x, g, align_corners=False), rtol=0, atol=1e-12)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the extension is not built")
@pytest.mark.parametrize("dims", (2, 3))
@pytest.mark.parametrize("padding", ("zeros", "border"))
@pytest.mark.parametrize("align", (False, True))
@pytest.mark.parametrize("channels", (3, 4, 5, 16, 21))
def test_cpu_point_tiles_equal_the_per_point_path_bitwise(dims, padding, align, channels):
    """fp32 bilinear on the CPU computes the taps of 16 consecutive points as vectors, unless one of
    them is far out (|coordinate| > 4) or not finite: then that group goes point by point. Moving one
    point of every other group far out must leave every other point's output and grid gradient
    bit for bit unchanged. (With 1 or 2 channels the tiles gather from the (N, C, ...) input itself, with 3
    or 4 from the input's bordered pixel quads.)"""
    x = make_input(dims, channels=channels, spatial=(6, 7, 9) if dims == 3 else (7, 9)).float()
    grid = make_grid(dims, out=(3, 2, 37) if dims == 3 else (2, 37), spread=1.3).float()
    moved = grid.clone()
    flat = moved.view(grid.shape[0], -1, dims)
    far = torch.arange(0, flat.shape[1], 32)
    flat[:, far, 0] = 5.0
    go = torch.randn(x.shape[:2] + grid.shape[1:-1], generator=torch.Generator().manual_seed(3))

    def run(g):
        xs, gs = x.detach().requires_grad_(True), g.detach().requires_grad_(True)
        out = attnkernels.grid_sample(xs, gs, "bilinear", padding, align, backend="cpu")
        return (out, *torch.autograd.grad(out, (xs, gs), go))

    out, _, grad_grid = run(grid)
    out_moved, _, grad_grid_moved = run(moved)
    keep = torch.ones(flat.shape[1], dtype=torch.bool)
    keep[far] = False
    assert torch.equal(out.flatten(2)[..., keep], out_moved.flatten(2)[..., keep])
    assert torch.equal(grad_grid.view_as(flat)[:, keep], grad_grid_moved.view_as(flat)[:, keep])


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the extension is not built")
@pytest.mark.parametrize("fused", (False, True))
def test_pixel_quads_setting_is_checked(fused, monkeypatch):
    """ATTNKERNELS_PIXEL_QUADS takes on, off or auto (empty: auto); anything else is an error naming it and the
    values it takes, where a forward of 3 channels reads it. Other channel counts never read it."""
    x = torch.rand(1, 3, 6, 7)
    theta = torch.tensor([[[0.9, 0.2, 0.1], [-0.2, 0.9, 0.0]]])
    grid = torch.nn.functional.affine_grid(theta, [1, 3, 5, 8], align_corners=False)

    def forward(channels=3):
        if fused:
            return attnkernels.affine_grid_sample(x[:, :channels], theta, [1, channels, 5, 8], align_corners=False,
                                                  backend="cpu")
        return attnkernels.grid_sample(x[:, :channels], grid, align_corners=False, backend="cpu")

    results = {}
    for value in ("on", "off", "auto", ""):
        monkeypatch.setenv("ATTNKERNELS_PIXEL_QUADS", value)
        results[value] = forward()
    for value in ("off", "auto", ""):
        assert torch.equal(results[value], results["on"]), value
    monkeypatch.setenv("ATTNKERNELS_PIXEL_QUADS", "yes")
    forward(channels=2)
    if attnkernels.cpu_capability() == "default":
        forward()  # no vector tiles: no quads, nothing to choose
        return
    with pytest.raises(RuntimeError, match="ATTNKERNELS_PIXEL_QUADS must be 'on', 'off' or 'auto'.*got 'yes'"):
        forward()


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the extension is not built")
@pytest.mark.parametrize("fused", (False, True))
@pytest.mark.parametrize("dims", (2, 3))
@pytest.mark.parametrize("padding", ("zeros", "border"))
def test_pair_gathers_setting_gives_the_same_bits(fused, dims, padding, monkeypatch):
    """The avx2 variant's forwards of 1 to 4 planar fp32 channels load x-neighbour taps as 64-bit pairs or one tap
    at a time, whichever the CPU runs faster (ATTNKERNELS_PAIR_GATHERS=on|off forces it): both must give the same
    bits, at points on and just past every edge and with infinite and NaN input values. Any other value is an error
    naming the variable where the avx2 variant reads it; the other variants never read it."""
    x = pixel_quad_input(dims, 4, "odd")
    theta = make_theta(dims, spread=0.6).float()
    size = [2, 4, *((3, 7, 40) if dims == 3 else (11, 40))]
    grid = torch.nn.functional.affine_grid(theta, size, align_corners=False).contiguous()
    flat = grid.view(2, -1, dims)
    special = torch.tensor([-1.0, 1.0, -1.2, 1.2, 3.9, -3.9, 1.0 + 1e-6, -1.0 - 1e-6])
    for axis in range(dims):
        flat[:, 8 * axis:8 * axis + 8, axis] = special

    def forward(channels):
        if fused:
            return attnkernels.affine_grid_sample(x[:, :channels], theta, [2, channels, *size[2:]],
                                                  padding_mode=padding, align_corners=False, backend="cpu")
        return attnkernels.grid_sample(x[:, :channels], grid, "bilinear", padding, False, backend="cpu")

    monkeypatch.setenv("ATTNKERNELS_PIXEL_QUADS", "off")  # 3 and 4 channels gather too
    for channels in (1, 2, 3, 4):
        results = {}
        for value in ("on", "off", "auto", ""):
            monkeypatch.setenv("ATTNKERNELS_PAIR_GATHERS", value)
            results[value] = forward(channels)
        for value in ("off", "auto", ""):
            assert torch.equal(float_bits(results[value]), float_bits(results["on"])), (channels, value)
        assert results["on"].isnan().any() and results["on"].isfinite().any()
    monkeypatch.setenv("ATTNKERNELS_PAIR_GATHERS", "yes")
    if attnkernels.cpu_capability() != "avx2":
        forward(1)
        return
    with pytest.raises(RuntimeError, match="ATTNKERNELS_PAIR_GATHERS must be 'on', 'off' or 'auto'.*got 'yes'"):
        forward(1)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the extension is not built")
@pixel_quad_cases
def test_cpu_pixel_quads_give_each_channel_sampled_alone_bitwise(dims, padding, align, channels, spatial, threads,
                                                                 forward_quads, monkeypatch):
    """fp32 bilinear with 3 or 4 channels reads the input as bordered pixel quads (a tap pair's channels in one
    load, a zero border for taps one position outside, a block of zeros for pairs further out) and scatters the
    input gradient into quads; one channel gathers from the planar input instead. Output, input gradient and
    grid gradient (the channels' terms added in channel order) must be bit for bit what each channel sampled
    alone gives: points exactly on and just past every edge, pairs wholly beyond the border, infinite and NaN
    input values, one-pixel axes, 1 and 3 threads (3 private gradients)."""
    monkeypatch.setenv("ATTNKERNELS_PIXEL_QUADS", forward_quads)
    x = pixel_quad_input(dims, channels, spatial)
    grid = make_grid(dims, torch.float32, out=(3, 7, 40) if dims == 3 else (11, 40), spread=1.3).clone()
    flat = grid.view(2, -1, dims)
    # On the edges, just past them, and far enough out that both taps of a pair miss the border (|v| <= 4 stays
    # in the tiles).
    special = torch.tensor([-1.0, 1.0, -1.2, 1.2, 3.9, -3.9, 1.0 + 1e-6, -1.0 - 1e-6])
    for axis in range(dims):
        flat[:, 8 * axis:8 * axis + 8, axis] = special
    go = torch.randn(x.shape[:2] + grid.shape[1:-1], generator=torch.Generator().manual_seed(5))

    def sample(a, g, gradient):
        a, g = a.detach().requires_grad_(True), g.detach().requires_grad_(True)
        out = attnkernels.grid_sample(a, g, "bilinear", padding, align, backend="cpu")
        return (out, *torch.autograd.grad(out, (a, g), gradient))

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        together = sample(x, grid, go)
        alone = [sample(x[:, c:c + 1], grid, go[:, c:c + 1]) for c in range(channels)]
    finally:
        torch.set_num_threads(previous)
    grad_grid = alone[0][2]
    for result in alone[1:]:
        grad_grid = grad_grid + result[2]
    expected = (torch.cat([r[0] for r in alone], 1), torch.cat([r[1] for r in alone], 1), grad_grid)
    # The default variant has no tiles: its point-by-point loops add the grid gradient's terms in another order.
    compared = 2 if attnkernels.cpu_capability() == "default" else 3
    for name, ours, theirs in zip(("output", "grad_input", "grad_grid")[:compared], together[:compared],
                                  expected[:compared], strict=True):
        assert torch.equal(float_bits(ours), float_bits(theirs)), name
    assert together[0].isnan().any() and together[0].isfinite().any()  # the special values reached the output


@pytest.mark.parametrize("dims", (2, 3))
@pytest.mark.parametrize("mode", MODES)
def test_size_one_axes_with_reflection_and_align_corners_give_zero_grid_gradient(dims, mode):
    """A 1-pixel input with reflection padding and align_corners=True samples position 0 whatever the
    grid: torch gives a zero grid gradient, and every backend must give it too (not cut the grid out of
    the graph, which made autograd.grad fail; found by the hypothesis test above)."""
    if dims == 3 and mode == "bicubic":
        pytest.skip("torch has no 5-D bicubic")
    x = torch.randn((1, 2, *([1] * dims)), dtype=torch.float64)
    grid = torch.rand((1, *([2] * dims), dims), generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 4 - 2
    theirs = forward_and_grads(lambda a, b: F.grid_sample(a, b, mode, "reflection", True), x, grid)
    for backend in cpu_backends():
        ours = forward_and_grads(
            lambda a, b, be=backend: attnkernels.grid_sample(a, b, mode, "reflection", True, backend=be), x, grid)
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=lambda m, be=backend: f"{be}: {m}")


def _banded_grid(dims: int, items: int, out: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """A grid whose slowest input axis (z in 3-D, y in 2-D) stays in a different band per batch item and
    per stretch of points: item 0 near the first plane (and exactly on it), item 1 everywhere, item 2 from
    the middle to past the last plane."""
    grid = torch.rand(items, *out, dims, generator=generator, dtype=torch.float64) * 2.2 - 1.1
    slow = grid[..., dims - 1]
    slow[0] = -1.0 + 0.4 * slow[0].add(1.1).div(2.2)
    slow[0].view(-1)[:7] = -1.0
    slow[2] = 0.2 + 0.5 * slow[2].add(1.1)
    # NaN: no tap with zeros padding; border and reflection put its taps on the first plane (4-D kernel)
    # or the last one (5-D), outside these bands.
    slow[0].view(-1)[10:13] = float("nan")
    slow[2].view(-1)[-5:] = float("nan")
    return grid


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the extension is not built")
@pytest.mark.parametrize("threads", (1, 3, 4))
@pytest.mark.parametrize("dims", (2, 3))
@pytest.mark.parametrize("mode", ("bilinear", "nearest", "bicubic"))
@pytest.mark.parametrize("padding", ("zeros", "border", "reflection"))
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32))
@pytest.mark.parametrize("channels_last", (False, True))
def test_cpu_backward_private_spans_give_the_input_gradient(threads, dims, mode, padding, dtype, channels_last):
    """Each thread of the CPU backward scatters into a private input gradient that holds only the input
    planes its range of points reaches. Grids reaching a different band of planes per batch item and per
    range (some points exactly on the first plane, some past the last, a few NaN), on inputs whose planes
    are not whole reduction tiles, give the reference's input gradient, zeros where no point reaches, for
    1, 3 and 4 threads."""
    if mode == "bicubic" and dims == 3:
        pytest.skip("torch has no 3-D bicubic")
    generator = torch.Generator().manual_seed(dims * 7 + threads)
    spatial = (5, 7, 9)[3 - dims:]
    out = (4, 10, 30)[3 - dims:]
    x = torch.randn(3, 6, *spatial, generator=generator, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last if dims == 2 else torch.channels_last_3d)
    grid = _banded_grid(dims, 3, out, generator)
    go = torch.randn(3, 6, *out, generator=generator, dtype=torch.float64)
    # The reference is the oracle: torch's own CPU backward can crash on NaN grids.
    expected = torch.autograd.grad(reference.grid_sample(x.requires_grad_(), grid, mode, padding, False), x, go)[0]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        xs = x.detach().to(dtype).requires_grad_()
        result = attnkernels.grid_sample(xs, grid.to(dtype), mode, padding, False, backend="cpu")
        grad = torch.autograd.grad(result, xs, go.to(dtype))[0]
    finally:
        torch.set_num_threads(previous)
    tolerance = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    # Bicubic weights come from the unpadded coordinate: NaN, where border or reflection padding put its taps.
    torch.testing.assert_close(grad.double(), expected, equal_nan=True, **tolerance)
    if padding == "zeros":  # the band of item 2 leaves its first plane untouched
        assert expected.flatten(2)[2, :, : spatial[-1] * spatial[-2] if dims == 3 else spatial[-1]].abs().max() == 0


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the extension is not built")
def test_cpu_backward_with_more_threads_than_the_memory_budget_allows():
    """A 20 MiB input gradient under a random grid: every thread's span is the whole input, and 8 of them
    would exceed the private memory budget (4 gradients), so the backward runs on fewer, larger ranges;
    the gradient is still torch's."""
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(1, 20, 16, 128, 128, generator=generator)
    grid = torch.rand(1, 4, 32, 32, 3, generator=generator) * 2 - 1
    go = torch.randn(1, 20, 4, 32, 32, generator=generator)
    xd = x.double().requires_grad_()
    expected = torch.autograd.grad(F.grid_sample(xd, grid.double(), align_corners=False), xd, go.double())[0]
    previous = torch.get_num_threads()
    torch.set_num_threads(8)
    try:
        xs = x.clone().requires_grad_()
        grad = torch.autograd.grad(attnkernels.grid_sample(xs, grid, align_corners=False, backend="cpu"), xs, go)[0]
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(grad.double(), expected, rtol=1e-5, atol=1e-5)
