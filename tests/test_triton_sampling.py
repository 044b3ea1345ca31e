"""What only the Triton sampling kernels have: tricubic, the triton_ops themselves, offsets, why_not.

tests/test_grid_sample.py and tests/test_affine.py run the checks every backend shares, triton
included (under TRITON_INTERPRET=1, and the fused sampler on CUDA tensors); this file covers what is
specific to the Triton backend. It runs on CPU
tensors under the Triton interpreter (CI) or on CUDA tensors on a GPU; GPU-only checks
(opcheck, inductor, large shapes) carry the `cuda` marker.
"""

from __future__ import annotations

import pytest
import sampling_cases
import torch
import torch.nn.functional as F
from backends import forward_and_grads, triton_device_or_skip_module
from sampling_cases import MODES, PADDINGS

import attnkernels
from attnkernels import reference

DEVICE = triton_device_or_skip_module()

import attnkernels.triton as triton_backend  # noqa: E402  (imports triton: only after the skips)

pytestmark = pytest.mark.triton  # selected by the GPU check (scripts/gpu_check.sh)


def make_input(dims, dtype=torch.float64, spatial=None, **kwargs):
    """Smaller than the other files' inputs: every kernel launch is slow under the interpreter."""
    spatial = spatial or ((4, 5, 6) if dims == 3 else (5, 6))
    return sampling_cases.make_input(dims, dtype, spatial=spatial, **kwargs).to(DEVICE)


def make_theta(dims, dtype=torch.float64, batch=2, seed=1):
    return sampling_cases.make_theta(dims, batch, dtype, spread=0.35, seed=seed).to(DEVICE)


def out_size(input, dims):
    return [input.shape[0], input.shape[1], *((3, 4, 5) if dims == 3 else (4, 7))]


def torch_affine_grid_sample(x, theta, size, mode, padding, align):
    return F.grid_sample(x, F.affine_grid(theta, size, align_corners=align), mode, padding, align)


def with_grads(fn, primals, seed=5):
    return forward_and_grads(fn, *primals, seed=seed)


@pytest.mark.parametrize("padding", PADDINGS)
def test_tricubic_affine_grid_sample_matches_reference(padding):
    """5-D bicubic (which torch lacks) against the plain-PyTorch reference; on CUDA the triton backend
    refuses it (64 unrolled taps take minutes to compile), and says so."""
    x, theta = make_input(3, channels=2), make_theta(3)
    size = out_size(x, 3)
    if DEVICE == "cuda":
        with pytest.raises(RuntimeError, match="tricubic"):
            attnkernels.affine_grid_sample(x, theta, size, "bicubic", padding, False, backend="triton")
        return
    ours = with_grads(lambda a, t: attnkernels.affine_grid_sample(a, t, size, "bicubic", padding, False,
                                                                  backend="triton"), (x, theta))
    oracle = with_grads(lambda a, t: reference.affine_grid_sample(a, t, size, "bicubic", padding, False), (x, theta))
    for a, b in zip(ours, oracle, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)


@pytest.mark.parametrize("dims", (2, 3))
def test_gradcheck_and_gradgradcheck(dims):
    x = make_input(dims, batch=1, channels=2, spatial=(2, 3, 3) if dims == 3 else (3, 4)).requires_grad_(True)
    theta = make_theta(dims, batch=1).requires_grad_(True)
    size = [1, 2, *((2, 2, 2) if dims == 3 else (2, 3))]
    grid = F.affine_grid(theta.detach(), size, align_corners=False).requires_grad_(True)

    def sample(a, g):
        return triton_backend.grid_sample(a, g, 0, 1, False)

    def fused(a, t):
        return triton_backend.affine_grid_sample(a, t, size, 0, 2, False)

    # fast_mode: a few random projections, since every kernel launch is slow under the interpreter.
    assert torch.autograd.gradcheck(sample, (x, grid), fast_mode=True)
    assert torch.autograd.gradcheck(fused, (x, theta), fast_mode=True)
    assert torch.autograd.gradgradcheck(sample, (x, grid), fast_mode=True)
    assert torch.autograd.gradgradcheck(fused, (x, theta), fast_mode=True)


def test_theta_gradient_is_deterministic():
    """The theta gradient is summed from per-program partials in a fixed order: bitwise repeatable."""
    x, theta = make_input(3, dtype=torch.float32, channels=5), make_theta(3, dtype=torch.float32)
    size = [2, 5, 5, 6, 7]
    runs = [with_grads(lambda a, t: triton_backend.affine_grid_sample(a, t, size, 0, 0, True), (x, theta))[2]
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def test_non_contiguous_inputs_and_channels_last_gradient():
    x = make_input(3, dtype=torch.float32, channels=4)
    theta = make_theta(3, dtype=torch.float32)
    size = out_size(x, 3)
    variants = {
        "channels_last_3d": x.contiguous(memory_format=torch.channels_last_3d),
        "strided view": torch.stack([x, x], 2)[:, :, 1],
    }
    theta_strided = theta.transpose(1, 2).contiguous().transpose(1, 2)
    expected = with_grads(lambda a, t: torch_affine_grid_sample(a, t, size, "bilinear", "zeros", True), (x, theta))
    for name, xv in variants.items():
        got = with_grads(lambda a, t: attnkernels.affine_grid_sample(a, t, size, "bilinear", "zeros", True,
                                                                     backend="triton"), (xv, theta_strided))
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    cl = variants["channels_last_3d"].detach().requires_grad_(True)
    out = attnkernels.affine_grid_sample(cl, theta, size, "bilinear", "zeros", True, backend="triton")
    (grad,) = torch.autograd.grad(out.sum(), cl)
    assert grad.is_contiguous(memory_format=torch.channels_last_3d)


def test_empty_batch_channels_and_output():
    for batch, channels, spatial in ((0, 3, (4, 5)), (2, 0, (4, 5)), (2, 3, (0, 5))):
        x = make_input(2, batch=batch, channels=channels).requires_grad_(True)
        grid = torch.zeros((batch, *spatial, 2), dtype=torch.float64, device=DEVICE, requires_grad=True)
        out = attnkernels.grid_sample(x, grid, "bilinear", "zeros", False, backend="triton")
        assert out.shape == (batch, channels, *spatial)
        grad_x, grad_grid = torch.autograd.grad(out.sum(), (x, grid), allow_unused=True)
        assert grad_x is None or (grad_x.shape == x.shape and not grad_x.abs().sum())
        assert grad_grid is None or (grad_grid.shape == grid.shape and not grad_grid.abs().sum())
    x = make_input(2)
    theta = make_theta(2)
    out = triton_backend.affine_grid_sample(x, theta, [2, 3, 4, 0], 0, 0, False)  # the API rejects this size
    assert out.shape == (2, 3, 4, 0)


def test_nan_grid_follows_the_policy_of_the_cpu_backend():
    """NaN coordinates behave as in torch's CPU kernels: the 4-D policy gives NaN with zero padding,
    the 5-D one skips the taps (0)."""
    for dims in (2, 3):
        x = make_input(dims, channels=2)
        grid = torch.full((2, *([1] * (dims - 1)), 3, dims), 0.25, dtype=torch.float64, device=DEVICE)
        grid[..., 0, 0] = float("nan")
        for padding in PADDINGS:
            ours = attnkernels.grid_sample(x, grid, "bilinear", padding, False, backend="triton")
            theirs = F.grid_sample(x.cpu(), grid.cpu(), "bilinear", padding, False)
            torch.testing.assert_close(ours.cpu(), theirs, rtol=0, atol=1e-12, equal_nan=True)


def test_why_not():
    x = make_input(2)
    for op in ("grid_sample", "affine_grid_sample"):
        for mode in MODES:
            assert triton_backend.why_not(op, x, mode=mode, dims=2, unknown_detail=1) is None
    assert "no bilinear_fast kernel" in triton_backend.why_not("bilinear_fast", x)
    assert "'lanczos'" in triton_backend.why_not("grid_sample", x, mode="lanczos", dims=2)
    assert "int64" in triton_backend.why_not("grid_sample", x.long(), mode="bilinear", dims=2)
    assert "meta" in triton_backend.why_not("grid_sample", x.to("meta"), mode="bilinear", dims=2)
    tricubic = triton_backend.why_not("grid_sample", x, mode="bicubic", dims=3)
    if DEVICE == "cuda":  # 64 unrolled taps take minutes to compile: interpreter only
        assert "tricubic" in tricubic
    else:
        assert tricubic is None
    with pytest.raises(RuntimeError, match="'triton' backend cannot serve"):
        attnkernels.grid_sample(x.to("meta"), x.new_zeros((2, 3, 4, 2)).to("meta"), "bilinear", "zeros", False,
                                backend="triton")


@pytest.mark.parametrize("dims", (2, 3))
def test_int64_offsets_give_the_same_results(dims, monkeypatch):
    """The int64-offset variant (WIDE), which the launchers pick past 2**31 elements per batch item,
    forced on small inputs: the same outputs and gradients as the int32 one, size-1 axes included."""
    from attnkernels.triton import _sampler

    x, theta = make_input(dims, channels=3), make_theta(dims)
    size = [*x.shape[:2], *([1] * (dims - 1)), 5]
    grid = F.affine_grid(theta, size, align_corners=False)

    def both():
        fused = with_grads(lambda a, t: attnkernels.affine_grid_sample(a, t, size, "bilinear", "border", False,
                                                                       backend="triton"), (x, theta))
        stored = with_grads(lambda a, g: attnkernels.grid_sample(a, g, "bilinear", "reflection", False,
                                                                 backend="triton"), (x, grid))
        return (*fused, *stored)

    narrow = both()
    monkeypatch.setattr(_sampler, "ALWAYS_WIDE", True)
    wide = both()
    for a, b in zip(narrow, wide, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_offset_width_and_launch_grid():
    from attnkernels.triton._sampler import item_extent, launch_grid, needs_wide_offsets

    assert not needs_wide_offsets(3, 2**31 - 2)
    assert needs_wide_offsets(3, 2**31 - 1)
    # (N, C, L) with a channel stride of 2**30: one item reaches past 2**31 elements.
    strided = torch.empty_strided((2, 3, 5), (0, 2**30, 1), device="meta")
    assert item_extent(strided) == 1 + 2 * 2**30 + 4 and needs_wide_offsets(item_extent(strided))
    # The batch shares grid axis x with the position blocks: no 65535 limit on it.
    assert launch_grid(70_000, 100, 64) == (140_000,)
    with pytest.raises(RuntimeError, match="split the batch"):
        launch_grid(2**20, 2**20, 16)


def test_torch_compile_fullgraph():
    """torch.compile sees the triton_ops (eager backend: inductor needs a GPU, see the cuda test)."""
    x = make_input(2, dtype=torch.float32)
    theta = make_theta(2, dtype=torch.float32).requires_grad_(True)
    size = out_size(x, 2)

    def fn(a, t):
        grid = F.affine_grid(t, size, align_corners=False)
        return triton_backend.grid_sample(a, grid, 0, 1, False) + triton_backend.affine_grid_sample(a, t, size, 0, 1,
                                                                                                     False)

    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    expected = fn(x, theta)
    got = compiled(x, theta)
    torch.testing.assert_close(got, expected)
    (grad,) = torch.autograd.grad(got.sum(), theta)
    (expected_grad,) = torch.autograd.grad(expected.sum(), theta)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- GPU only


@pytest.mark.cuda
def test_batch_beyond_65535_on_gpu():
    x = torch.randn(70_000, 2, 3, 4, device="cuda")
    theta = torch.eye(2, 3, device="cuda").repeat(70_000, 1, 1)
    theta[:, :, 2] = torch.linspace(-0.5, 0.5, 70_000, device="cuda")[:, None]
    ours = attnkernels.affine_grid_sample(x, theta, backend="triton")
    theirs = F.grid_sample(x, F.affine_grid(theta, x.shape, align_corners=False), align_corners=False)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_opcheck_on_gpu():
    x = make_input(3, dtype=torch.float32).to("cuda").requires_grad_(True)
    theta = make_theta(3, dtype=torch.float32).to("cuda").requires_grad_(True)
    grid = F.affine_grid(theta.detach(), out_size(x, 3), align_corners=False).requires_grad_(True)
    ops = torch.ops.attnkernels
    torch.library.opcheck(ops.triton_grid_sample, (x, grid, 0, 1, False))
    torch.library.opcheck(ops.triton_affine_grid_sample, (x, theta, out_size(x, 3), 0, 2, True))


@pytest.mark.cuda
def test_inductor_compile_on_gpu():
    x = make_input(3, dtype=torch.float32).to("cuda")
    theta = make_theta(3, dtype=torch.float32).to("cuda").requires_grad_(True)
    size = out_size(x, 3)

    def fn(a, t):
        return attnkernels.affine_grid_sample(a, t, size, "bilinear", "zeros", False, backend="triton")

    got = torch.compile(fn, fullgraph=True)(x, theta)
    torch.testing.assert_close(got, fn(x, theta))


@pytest.mark.cuda
def test_large_video_volume_on_gpu():
    """A video-sized 3-D problem in bf16 and fp32 against torch, forward and backward."""
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 32, 16, 112, 112, device="cuda", dtype=dtype)
        theta = make_theta(3, dtype=dtype).to("cuda")
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        ours = with_grads(lambda a, g: attnkernels.grid_sample(a, g, "bilinear", "zeros", False, backend="triton"),
                          (x, grid))
        truth = with_grads(lambda a, g: F.grid_sample(a, g, "bilinear", "zeros", False), (x.double(), grid.double()))
        theirs = with_grads(lambda a, g: F.grid_sample(a, g, "bilinear", "zeros", False), (x, grid))
        for a, b, t in zip(ours, theirs, truth, strict=True):
            ulp = torch.finfo(dtype).eps * max(1.0, t.abs().max().item())
            assert (a.double() - t).abs().max() <= 2 * (b.double() - t).abs().max() + ulp
