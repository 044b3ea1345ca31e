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
from attention_cases import cpu_dropout_on_identity, gradients, output_gradient
from cpp_unit import VARIANT_FLAGS, build_and_run, needs_gxx
from hypothesis import given, settings
from hypothesis import strategies as st

import attnkernels


@needs_gxx
@pytest.mark.parametrize("variant", sorted(VARIANT_FLAGS))
def test_dot_tiles_cpp_unit_test(tmp_path, variant):
    """The tiles as each variant compiles them: 8 x 32 (AVX-512, and bfloat16 dot products) and 6 x 16 (AVX2)."""
    build_and_run("dot_tiles_test.cpp", tmp_path, VARIANT_FLAGS[variant])


@needs_gxx
def test_float16_outputs_narrow_to_the_bits_of_the_scalar_conversion(tmp_path):
    """narrow_scaled (tests/cpp/narrow_test.cpp): attention's float16 outputs and key/value gradients convert
    eight at a time (vcvtps2ph), bit for bit as c10's scalar conversion, subnormals, ties and NaN included."""
    build_and_run("narrow_test.cpp", tmp_path, VARIANT_FLAGS["avx2"], standard="c++20")


@needs_gxx
def test_scratch_buffers_start_on_a_cache_line(tmp_path):
    """The CPU kernels' scratch memory on every thread (tests/cpp/scratch_alignment_test.cpp): buffers at
    malloc's 16-byte alignment made the thread whose rows straddled cache lines ~15 % slower per attention task."""
    build_and_run("scratch_alignment_test.cpp", tmp_path, VARIANT_FLAGS["avx2"])


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
    assert_flash_attention_rule(ours, theirs, exact, dtype, flash_delta_slack(problem, dtype, causal, group))


def assert_flash_attention_rule(ours, theirs, exact, dtype, slack):
    """[out, dq, dk, dv] in dtype: our error against float64 at most twice torch's (three times for gradients),
    plus 1e-3 and twice the FlashAttention delta slack."""
    for index, (mine, torchs, truth) in enumerate(zip(ours, theirs, exact, strict=True)):
        assert mine.dtype == dtype and not mine.isnan().any()
        our_error = (mine.double() - truth).abs().max().item()
        torch_error = (torchs.double() - truth).abs().nan_to_num(0).max().item()
        bound = (2 if index == 0 else 3) * torch_error + 1e-3 + 2 * slack[index]
        assert our_error <= bound, (index, our_error, torch_error, slack[index])


def flash_delta_slack(problem, dtype, causal, group):
    """How far the gradients [out, dq, dk, dv] of a FlashAttention backward may be from exact because it takes the
    softmax gradient's row term delta = rowsum(dO * O) from the output O as rounded to dtype, computed in float64.
    torch takes its math backend for some small shapes (e.g. head dims that differ), whose delta comes from the
    probabilities and has no such error; there the FlashAttention rule (twice torch's error) would ask more than
    the algorithm can give. dS = P (dP - delta) moves by -P d_delta: dq by -scale d_delta (P K), dk by
    -scale P^T (d_delta q)."""
    (q, k, v), mask = problem
    keys, values = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scale = q.shape[-1] ** -0.5
    scores = scale * q @ keys.transpose(-1, -2)
    if causal:
        scores = scores.masked_fill(torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    elif mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores, -1).nan_to_num(0)
    out = probs @ values
    grad_out = output_gradient(out.shape, dtype).double()
    delta_error = (grad_out * (out.to(dtype).double() - out)).sum(-1, keepdim=True)
    dq = scale * delta_error * (probs @ keys)
    dk = scale * (probs.transpose(-1, -2) @ (delta_error * q))
    dk = dk.unflatten(1, (k.shape[1], group)).sum(2)
    return [0.0, dq.abs().max().item(), dk.abs().max().item(), 0.0]


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


def assert_same_bits(one, many, name):
    """Equal bits, except where the products run on the BLAS torch ships (float64; every dtype in the
    default variant, which has no register tiles): MKL (on Intel CPUs) sums a product in an order that
    depends on its thread count, so a few ulps apart (measured: 2.5e-16 in float64 on a Xeon with AMX;
    bit-equal on AMD Zen 4), one rounding step of a 16-bit result at most. A task-splitting error moves
    results far more than that."""
    if one.dtype == torch.float64:
        torch.testing.assert_close(one, many, rtol=1e-13, atol=1e-13, msg=name)
    elif attnkernels.cpu_capability() == "default":
        tolerance = 1e-5 if one.dtype == torch.float32 else 1e-2
        torch.testing.assert_close(one, many, rtol=tolerance, atol=tolerance, msg=name)
    else:
        assert torch.equal(one, many), name


def results_per_thread_count(thread_counts, run):
    """{threads: run()} with torch's thread count set to each in turn (restored afterwards)."""
    results = {}
    previous = torch.get_num_threads()
    try:
        for threads in thread_counts:
            torch.set_num_threads(threads)
            results[threads] = run()
    finally:
        torch.set_num_threads(previous)
    return results


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("causal", [False, True])
def test_forward_tasks_split_at_the_end_change_no_bit(dtype, causal):
    """With several threads the forward gives the last heads' query blocks out one at a time, costliest
    first, after tasks of several blocks (with 2 threads here: two heads in tasks of 2 + 2 + 1 blocks,
    two heads block by block; with 1 thread tasks of 4 + 1 blocks). A causal block in a task of several
    takes the task's keys whole, its diagonal hiding what it cannot see. None of that may change a bit
    of the output or lse, and the output must be right."""
    L, S, E, Ev = 1100, 1100, 32, 32  # five query blocks of 256 rows, the last one partial
    (q64, k64, v64), _ = random_problem(17, L, S, E, Ev, 2, causal, None)
    q, k, v = (t.to(dtype) for t in (q64, k64, v64))
    results = results_per_thread_count((1, 2, 3), lambda: attnkernels.attention_with_lse(
        q, k, v, is_causal=causal, enable_gqa=True, backend="cpu"))
    for threads in (2, 3):
        for name, one, many in zip(("out", "lse"), results[1], results[threads], strict=True):
            assert_same_bits(one, many, f"{name} with {threads} threads")
    exact = F.scaled_dot_product_attention(q64, k64, v64, is_causal=causal, enable_gqa=True)
    tolerance = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(results[1][0].double(), exact, atol=tolerance, rtol=tolerance)


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize(("causal", "mask_kind", "dropout_p"),
                         [(False, None, 0.0), (True, None, 0.0), (False, "bool", 0.0), (True, None, 0.25)])
@pytest.mark.parametrize("Ev", [24, 32])
def test_tasks_of_several_blocks_change_no_bit(dtype, causal, mask_kind, dropout_p, Ev):
    """A forward task takes up to four query blocks of 256 rows and packs each key block once for them all; a
    backward task with several key blocks packs each query block once for them all. How many blocks a task gets
    depends on the thread count: here with 1 thread three query blocks per forward task and three key blocks per
    backward task, with 8 one of each. That must change no bit of the output, lse, dK and dV (each block's
    products are the same; dQ is summed over the tasks in another order), and the results must be right."""
    # Three query and three key blocks (the last ones partial); Ev = 32: on AMX the backward's tiles too.
    L, S, E, group = 700, 600, 32, 2
    problem = random_problem(11, L, S, E, Ev, group, causal, mask_kind)
    (q64, k64, v64), mask = problem
    kwargs = {"dropout_p": dropout_p, "is_causal": causal, "enable_gqa": True, "backend": "cpu"}

    def run():
        q, k, v = (t.to(dtype).requires_grad_() for t in (q64, k64, v64))
        torch.manual_seed(5)  # the dropout mask's seed
        out, lse = attnkernels.attention_with_lse(q, k, v, mask, **kwargs)
        return [out, lse, *gradients(out, (q, k, v))]

    results = results_per_thread_count((1, 8), run)
    for name, one, many in zip(("out", "lse", "dq", "dk", "dv"), results[1], results[8], strict=True):
        if name == "dq":
            torch.testing.assert_close(one, many, atol=1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-5,
                                       rtol=1e-2, msg=name)
        else:
            assert_same_bits(one, many, name)
    if dropout_p == 0:
        exact = output_and_gradients(problem, torch.float64, lambda q, k, v, m: F.scaled_dot_product_attention(
            q, k, v, m, is_causal=causal, enable_gqa=True))
        tolerance = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
        for mine, truth in zip([results[1][0], *results[1][2:]], exact, strict=True):
            torch.testing.assert_close(mine.double(), truth, atol=tolerance, rtol=tolerance)


@needs_cpu_kernel
@pytest.mark.parametrize(("L", "S", "E", "Ev"), [(300, 333, 64, 64), (45, 97, 32, 14), (257, 513, 128, 96),
                                                 (520, 1030, 64, 32), (33, 31, 96, 2)])
@pytest.mark.parametrize(("causal", "mask_kind"), [(False, None), (True, None), (False, "bool"), (False, "float")])
def test_bfloat16_head_dims_of_32_keep_the_flash_attention_rule(L, S, E, Ev, causal, mask_kind):
    """Head dims that are multiples of 32: on a CPU with AMX-BF16 (capability avx512_amx) the forward's products run
    on the AMX tiles in blocks of 32 x 32 with a reduction step of 32 keys: every row, column and key tail of those
    blocks (and of the 256 x 512 task blocks) here, held to the FlashAttention rule like the other paths."""
    problem = random_problem(L * 7 + S, L, S, E, Ev, 2, causal, mask_kind)
    kwargs = {"is_causal": causal, "enable_gqa": True}
    ours = output_and_gradients(problem, torch.bfloat16, lambda q, k, v, m: attnkernels.scaled_dot_product_attention(
        q, k, v, m, backend="cpu", **kwargs))
    theirs = output_and_gradients(problem, torch.bfloat16,
                                  lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, m, **kwargs))
    exact = output_and_gradients(problem, torch.float64,
                                 lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, m, **kwargs))
    assert_flash_attention_rule(ours, theirs, exact, torch.bfloat16,
                                flash_delta_slack(problem, torch.bfloat16, causal, 2))


@needs_cpu_kernel
@pytest.mark.parametrize("causal", [False, True])
def test_tiles_dropout_keeps_the_kernels_mask(causal):
    """bfloat16 dropout on the tile products (AMX where the CPU has it: head dims of 32 and 64, many queries): with
    value = identity the output is the dropped probabilities, rounded to bfloat16 for the product; the keep pattern
    is the kernel's own mask (kernel_dropout_mask) and the kept weights P / (1 - p) to bfloat16's precision."""
    p, L, S, heads = 0.3, 70, 64, 2
    generator = torch.Generator().manual_seed(8)
    q = torch.randn(1, heads, L, 32, generator=generator, dtype=torch.float64).bfloat16()
    k = torch.randn(1, heads, S, 32, generator=generator, dtype=torch.float64).bfloat16()
    weights, keep = cpu_dropout_on_identity(q, k, p, causal)
    scores = (q.double() @ k.double().transpose(-1, -2)) / 32**0.5
    if causal:
        scores = scores.masked_fill(~torch.ones(L, S, dtype=torch.bool).tril(), float("-inf"))
    assert torch.equal(weights != 0, keep)
    probs = scores.softmax(-1)
    torch.testing.assert_close(weights[keep].double(), probs[keep] / (1 - p), atol=1e-2, rtol=1e-2)
