"""The CPU attention forward for a few query rows per head (csrc/cpu/direct_tiles.h: keys and values read
in place, no packing), which the avx2 and avx512 variants take for float32, bfloat16 and float16 when
L <= 16 (float32 on AVX2: L <= 8; bfloat16 on the AVX512-BF16 dot products: L <= 4). Its products are
unit-tested in C++ (tests/cpp/direct_tiles_test.cpp, under AddressSanitizer) with each variant's flags;
here the whole forward: against float64 and torch (FlashAttention rule), with every mask kind, causal,
GQA, dropout, NaN and infinities, several key blocks, slices of a larger cache, and thread counts."""

from __future__ import annotations

import math
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F
from attention_cases import cpu_dropout_on_identity, gradients, keep_pattern_after_seed
from cpp_unit import VARIANT_FLAGS, build_and_run, needs_gxx
from hypothesis import given, settings
from hypothesis import strategies as st
from test_dot_tiles import assert_flash_attention_rule, flash_delta_slack, results_per_thread_count

import attnkernels
from attnkernels import reference

needs_cpu_kernel = pytest.mark.skipif(not attnkernels._extension.has_extension(),
                                      reason="the compiled extension is not built")
LOW_PRECISION = [torch.bfloat16, torch.float16]


def _has_asan() -> bool:
    """Whether g++ links AddressSanitizer here (the unit test then catches a read past a key row's end)."""
    if shutil.which("g++") is None:
        return False
    probe = subprocess.run(["g++", "-fsanitize=address", "-x", "c++", "-", "-o", "/dev/null"],
                           input="int main() { return 0; }", capture_output=True, text=True)
    return probe.returncode == 0


@needs_gxx
@pytest.mark.parametrize("variant", sorted(VARIANT_FLAGS))
def test_direct_tiles_cpp_unit_test(tmp_path, variant):
    sanitizer = ["-fsanitize=address", "-fno-omit-frame-pointer"] if _has_asan() else []
    build_and_run("direct_tiles_test.cpp", tmp_path, [*VARIANT_FLAGS[variant], *sanitizer])


def _problem(seed, batch, q_heads, kv_heads, L, S, E, Ev, mask_kind):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, L, E, generator=generator, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, S, E, generator=generator, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, S, Ev, generator=generator, dtype=torch.float64)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(L, S, generator=generator) > 0.3
        mask[:, -1] = True  # every row attends to something (fully masked rows: below)
    elif mask_kind == "float":
        mask = torch.randn(batch, 1, L, S, generator=generator, dtype=torch.float64)
    return q, k, v, mask


def _forward_and_gradients(inputs, mask, dtype, attention):
    q, k, v = (t.to(dtype).requires_grad_() for t in inputs)
    if mask is not None and mask.is_floating_point():
        mask = mask.to(dtype)
    out = attention(q, k, v, mask)
    return [out, *gradients(out, (q, k, v))]


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION])
@settings(max_examples=25, deadline=None)
@given(L=st.integers(1, 17), S=st.integers(1, 1100), E=st.sampled_from([1, 7, 16, 33, 64, 72, 128]),
       Ev=st.sampled_from([1, 5, 16, 40, 64, 100]), group=st.sampled_from([1, 2, 3]), causal=st.booleans(),
       mask_kind=st.sampled_from([None, "bool", "float"]))
def test_few_queries_keep_the_flash_attention_rule(dtype, L, S, E, Ev, group, causal, mask_kind):
    """Rows 1 to 17 (the last one past every threshold), keys up to three blocks of 512, head dims with and
    without a partial last vector: output and gradients against float64 within twice torch's error (float32:
    within its rounding)."""
    if causal:
        mask_kind = None
    q, k, v, mask = _problem(L * 7919 + S, 2, 2 * group, 2, L, S, E, Ev, mask_kind)
    kwargs = {"is_causal": causal, "enable_gqa": group > 1}
    ours = _forward_and_gradients((q, k, v), mask, dtype, lambda q, k, v, m: attnkernels.scaled_dot_product_attention(
        q, k, v, m, backend="cpu", **kwargs))
    exact = _forward_and_gradients((q, k, v), mask, torch.float64,
                                   lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, m, **kwargs))
    if dtype == torch.float32:
        for name, mine, truth in zip(("output", "grad q", "grad k", "grad v"), ours, exact, strict=True):
            torch.testing.assert_close(mine.double(), truth, atol=2e-5, rtol=1e-4, msg=name)
        return
    theirs = _forward_and_gradients((q, k, v), mask, dtype,
                                    lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, m, **kwargs))
    # torch's math path (some small shapes) has no FlashAttention delta error: allowed for as in test_dot_tiles
    assert_flash_attention_rule(ours, theirs, exact, dtype, flash_delta_slack(((q, k, v), mask), dtype, causal, group))


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION])
@pytest.mark.parametrize("L", [1, 3, 16])
def test_lse_and_fully_masked_rows(dtype, L):
    """lse is the log-sum-exp of the scaled, masked scores; a row that attends to nothing gives 0 and lse -inf."""
    q, k, v, _ = _problem(5, 1, 2, 2, L, 700, 24, 24, None)
    mask = torch.rand(L, 700, generator=torch.Generator().manual_seed(2)) > 0.5
    mask[L // 2] = False
    out, lse = attnkernels.attention_with_lse(q.to(dtype), k.to(dtype), v.to(dtype), mask, scale=0.3, backend="cpu")
    scores = (q.to(dtype).double() @ k.to(dtype).double().transpose(-1, -2)) * 0.3
    expected_lse = torch.logsumexp(scores.masked_fill(~mask, -math.inf), -1)
    assert lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), expected_lse, atol=1e-4, rtol=1e-5)
    assert torch.isneginf(lse[..., L // 2]).all() and (out[..., L // 2, :] == 0).all()


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_draws_the_kernels_mask(dtype):
    """With value = identity the output is the dropped probabilities: the keep pattern is the cpu kernel's own
    (kernel_dropout_mask, the one every query count draws), kept weights P / (1 - p)."""
    p, L, S, heads = 0.3, 3, 40, 2
    q, k, _, _ = _problem(9, 1, heads, heads, L, S, 8, 8, None)
    weights, keep = cpu_dropout_on_identity(q.to(dtype), k.to(dtype), p)
    assert torch.equal(weights != 0, keep)
    identity = torch.eye(S, dtype=torch.float64).expand(1, heads, S, S)
    probs = reference.scaled_dot_product_attention(q.to(dtype).double(), k.to(dtype).double(), identity)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(weights[keep].double(), probs[keep] / (1 - p), atol=tolerance, rtol=tolerance)


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_finite_inputs_reach_the_rows_they_reach_in_torch(dtype):
    """A NaN query row makes its own row NaN only; a NaN key behind the causal diagonal stays hidden from the
    rows before it (the last of four rows sees it); an infinite value a row attends to makes that row NaN."""
    q, k, v, _ = _problem(3, 1, 2, 2, 4, 600, 16, 16, None)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    q[0, 0, 1, 3] = math.nan
    k[0, 1, 3, 5] = math.nan
    v[0, 0, 550, 2] = math.inf
    for causal in (False, True):
        ours = attnkernels.scaled_dot_product_attention(q, k, v, is_causal=causal, backend="cpu")
        theirs = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        assert torch.equal(ours.isnan(), theirs.isnan()), causal
        torch.testing.assert_close(ours.nan_to_num(7.0), theirs.nan_to_num(7.0), atol=2e-2, rtol=2e-2)
    causal = attnkernels.scaled_dot_product_attention(q, k, v, is_causal=True, backend="cpu")
    nan_rows = causal.isnan().any(-1)[0]
    assert nan_rows[0].tolist() == [False, True, False, False] and nan_rows[1].tolist() == [False, False, False, True]


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_keys_and_values_sliced_from_a_cache(dtype):
    """Keys and values as views of a longer cache (a stride between heads that is not S * E), and a query
    transposed from (B, L, H, E): the same result as contiguous copies."""
    generator = torch.Generator().manual_seed(6)
    cache_k, cache_v = (torch.randn(2, 4, 1000, 32, generator=generator).to(dtype) for _ in range(2))
    q = torch.randn(2, 1, 4, 32, generator=generator).to(dtype).transpose(1, 2)
    k, v = cache_k[:, :, :777], cache_v[:, :, :777]
    ours = attnkernels.scaled_dot_product_attention(q, k, v, backend="cpu")
    copies = attnkernels.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous(), backend="cpu")
    assert torch.equal(ours, copies)
    torch.testing.assert_close(ours.double(), F.scaled_dot_product_attention(q.double(), k.double(), v.double()),
                               atol=2e-3 if dtype == torch.float16 else 1e-5, rtol=1e-3)


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_thread_counts_change_no_bit(dtype):
    """One task per (batch, head), each running over three key blocks: 1, 2 and 3 threads give the same bits."""
    q, k, v, _ = _problem(8, 3, 4, 2, 2, 1300, 64, 64, None)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    results = results_per_thread_count((1, 2, 3), lambda: attnkernels.attention_with_lse(q, k, v, enable_gqa=True,
                                                                                          backend="cpu"))
    for threads in (2, 3):
        for name, one, many in zip(("out", "lse"), results[1], results[threads], strict=True):
            assert torch.equal(one, many), f"{name} with {threads} threads"


def _manual_attention(q, k, v, mask=None, keep=None, p=0.0):
    """float64 softmax(q kᵀ / √E + mask) v, the weights dropped where keep is False and the rest scaled by
    1 / (1 - p): written out, so that autograd gives the exact gradients of what the kernel computes."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores + mask
    weights = torch.softmax(scores, -1)
    if keep is not None:
        weights = weights * keep / (1 - p)
    return weights @ v


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("L", [1, 3, 6])
def test_gradients_with_dropout_and_a_float_mask(dtype, L):
    """The backward of the few-query path redraws the forward's dropout mask (the kernel's own, from the same seed)
    and gives the float mask its gradient: every gradient against float64 autograd through the same keep pattern."""
    p, S, heads = 0.25, 300, 2
    q64, k64, v64, _ = _problem(12, 1, heads, heads, L, S, 40, 24, None)
    mask64 = torch.randn(1, heads, L, S, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    inputs = [t.to(dtype).requires_grad_() for t in (q64, k64, v64, mask64)]
    torch.manual_seed(21)
    out = attnkernels.scaled_dot_product_attention(*inputs[:3], attn_mask=inputs[3], dropout_p=p, backend="cpu")
    ours = [out, *gradients(out, inputs)]
    keep = keep_pattern_after_seed(21, (1, heads, L, S), p)
    exact_inputs = [t.detach().double().requires_grad_() for t in inputs]
    exact_out = _manual_attention(*exact_inputs, keep=keep, p=p)
    exact = [exact_out, *gradients(exact_out, exact_inputs)]
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    for name, mine, truth in zip(("output", "grad q", "grad k", "grad v", "grad mask"), ours, exact, strict=True):
        assert mine.dtype == dtype, name
        torch.testing.assert_close(mine.double(), truth, atol=tolerance, rtol=tolerance, msg=name)
