"""The register transposes around the CPU sampling loops (csrc/cpu/transpose_tiles.h: the channels-last copy of
the input, grad_output staged point-major, the output and the summed private input gradients written back),
unit-tested in C++ (tests/cpp/transpose_test.cpp) for every block shape with each variant's flags and the plain
ones; and the float32 sampler through them against float64 torch, on channel counts around the tile sides."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cpp_unit import VARIANT_FLAGS, build_and_run, needs_gxx

import attnkernels

needs_cpu_kernel = pytest.mark.skipif(not attnkernels._extension.has_extension(),
                                      reason="the compiled extension is not built")


@needs_gxx
@pytest.mark.parametrize("variant", [*sorted(VARIANT_FLAGS), "default"])
def test_transpose_cpp_unit_test(tmp_path, variant):
    """16 x 16 blocks (AVX-512), 8 x 8 (AVX2) and element by element (default), partial blocks masked."""
    output = build_and_run("transpose_test.cpp", tmp_path, VARIANT_FLAGS.get(variant, []))
    assert f"tile side {dict(avx512=16, avx2=8, default=1)[variant]}" in output


@needs_cpu_kernel
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("channels", [5, 8, 9, 16, 17, 33])
@pytest.mark.parametrize("channels_last", [False, True])
def test_sampler_through_transposes_matches_float64(dims, channels, channels_last):
    """float32 forward and backward (C > 4: the channels-last sampler) on odd output sizes, so that point groups
    and channel blocks both end in partial tiles, within float32 rounding of float64 torch."""
    generator = torch.Generator().manual_seed(channels * 10 + dims)
    size = (2, channels, *([5, 7, 9][3 - dims:]))
    x = torch.randn(size, generator=generator)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last if dims == 2 else torch.channels_last_3d)
    grid = torch.rand(2, *([3, 11, 19][3 - dims:]), dims, generator=generator) * 2.4 - 1.2
    grad_out = torch.randn(2, channels, *grid.shape[1:-1], generator=generator)
    x32, grid32 = x.clone().requires_grad_(), grid.clone().requires_grad_()
    out = attnkernels.grid_sample(x32, grid32, align_corners=False, backend="cpu")
    out.backward(grad_out)
    x64, grid64 = x.double().requires_grad_(), grid.double().requires_grad_()
    expected = F.grid_sample(x64, grid64, align_corners=False)
    expected.backward(grad_out.double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x32.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grid32.grad.double(), grid64.grad, rtol=1e-4, atol=1e-4)
    assert x32.grad.is_contiguous() or channels_last
