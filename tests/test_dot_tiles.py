"""The register-tile products of the CPU attention kernels (csrc/cpu/dot_tiles.h: float32 FMAs, bfloat16
AVX512-BF16 dot products), unit-tested in C++ (tests/cpp/dot_tiles_test.cpp) against double loops on the
same values, built with the avx512 and the avx2 variant's flags; and bfloat16 and float16 attention on random shapes,
held to the FlashAttention rule against torch: bfloat16 with even head dims takes the dot products when
attnkernels.cpu_capability() is "avx512_bf16", the rest is widened to float32 and takes the float32 tiles (in the avx2
and avx512 variants). float32 attention on those tiles is checked to 1e-5 by tests/test_attention.py's float32 cases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from attention_cases import gradients
from cpp_unit import VARIANT_FLAGS, build_and_run, needs_gxx
from hypothesis import given, settings
from hypothesis import strategies as st

import attnkernels


@needs_gxx
@pytest.mark.parametrize("variant", sorted(VARIANT_FLAGS))
def test_dot_tiles_cpp_unit_test(tmp_path, variant):
    """The tiles as each variant compiles them: 8 x 32 (AVX-512, and bfloat16 dot products) and 6 x 16 (AVX2)."""
    build_and_run("dot_tiles_test.cpp", tmp_path, VARIANT_FLAGS[variant])


needs_cpu_kernel = pytest.mark.skipif(not attnkernels._extension.has_extension(),
                                      reason="the compiled extension is not built")


def random_problem(seed, L, S, E, Ev, group, causal, mask_kind):
    """float64 q (1, 2 * group, L, E), k (1, 2, S, E), v (1, 2, S, Ev) and a mask (None when causal)."""
    generator = torch.Generator().manual_seed(seed)
    q64 = torch.randn(1, 2 * group, L, E, generator=generator, dtype=torch.float64)
    k64 = torch.randn(1, 2, S, E, generator=generator, dtype=torch.float64)
    v64 = torch.randn(1, 2, S, Ev, generator=generator, dtype=torch.float64)
    mask = None
    if not causal and mask_kind == "bool":
        mask = torch.rand(L, S, generator=generator) > 0.3
        mask[:, 0] = True  # fully masked rows are tested elsewhere; here they would only make NaN truths
    elif not causal and mask_kind == "float":
        mask = torch.randn(L, S, generator=generator, dtype=torch.float64)
    return (q64, k64, v64), mask


def output_and_gradients(problem, dtype, attention):
    """attention(q, k, v, mask) on the problem's inputs in dtype: [out, dq, dk, dv]."""
    inputs, mask = problem
    q, k, v = (t.to(dtype).requires_grad_() for t in inputs)
    out = attention(q, k, v, mask if mask is None or mask.dtype == torch.bool else mask.to(dtype))
    return [out, *gradients(out, (q, k, v))]


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@settings(max_examples=15, deadline=None)
@given(L=st.integers(1, 300), S=st.integers(1, 600), E=st.sampled_from([2, 5, 6, 16, 30, 33, 64, 80, 128]),
       Ev=st.sampled_from([2, 7, 14, 32, 64, 96]), group=st.sampled_from([1, 2]), causal=st.booleans(),
       mask_kind=st.sampled_from([None, "bool", "float"]))
def test_low_precision_random_shapes_keep_the_flash_attention_rule(dtype, L, S, E, Ev, group, causal, mask_kind):
    """Every row and column tail of the tiles (L, S up to two blocks); even head dims (bfloat16's dot products)
    and odd ones (widened to float32)."""
    problem = random_problem(L * 1000 + S, L, S, E, Ev, group, causal, mask_kind)
    kwargs = {"is_causal": causal, "enable_gqa": group > 1}
    ours = output_and_gradients(problem, dtype, lambda q, k, v, m: attnkernels.scaled_dot_product_attention(
        q, k, v, m, backend="cpu", **kwargs))
    theirs = output_and_gradients(problem, dtype,
                                  lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, m, **kwargs))
    exact = output_and_gradients(problem, torch.float64,
                                 lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, m, **kwargs))
    for index, (mine, torchs, truth) in enumerate(zip(ours, theirs, exact, strict=True)):
        assert mine.dtype == dtype and not mine.isnan().any()
        our_error = (mine.double() - truth).abs().max().item()
        torch_error = (torchs.double() - truth).abs().nan_to_num(0).max().item()
        assert our_error <= (2 if index == 0 else 3) * torch_error + 1e-3, (index, our_error, torch_error)


@needs_cpu_kernel
@settings(max_examples=15, deadline=None)
@given(L=st.integers(1, 300), S=st.integers(1, 600), E=st.integers(1, 96), Ev=st.integers(1, 80),
       group=st.sampled_from([1, 2]), causal=st.booleans(), mask_kind=st.sampled_from([None, "bool", "float"]))
def test_float32_random_shapes_match_float64(L, S, E, Ev, group, causal, mask_kind):
    """float32 on the register tiles (the avx512 variant; BLAS elsewhere), causal tiles skipping the
    products behind the diagonal: output and gradients within float32 rounding of a float64 computation."""
    problem = random_problem(L * 1000 + S + E, L, S, E, Ev, group, causal, mask_kind)
    kwargs = {"is_causal": causal, "enable_gqa": group > 1}
    ours = output_and_gradients(problem, torch.float32, lambda q, k, v, m: attnkernels.scaled_dot_product_attention(
        q, k, v, m, backend="cpu", **kwargs))
    exact = output_and_gradients(problem, torch.float64,
                                 lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, m, **kwargs))
    for name, mine, truth in zip(("output", "grad q", "grad k", "grad v"), ours, exact, strict=True):
        torch.testing.assert_close(mine.double(), truth, atol=2e-4, rtol=1e-4, msg=name)
