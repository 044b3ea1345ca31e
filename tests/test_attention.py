"""attnkernels.scaled_dot_product_attention / attention_with_lse / merge_attention against torch's
math backend and the plain-PyTorch reference, on every backend that runs on CPU tensors here
(the argument checks are in tests/test_attention_errors.py; the masked-row, NaN, layout, dropout-mask
and empty-input checks, shared with CUDA tensors, in tests/test_attention_devices.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from attention_cases import CASES, gradients, keep_pattern_after_seed, make_inputs, make_mask, torch_math
from backends import ON_CPU, device_backends, serve_or_skip
from conftest import cpu_backends
from hypothesis import given, settings
from hypothesis import strategies as st

import attnkernels
from attnkernels import reference

BACKENDS = cpu_backends()
PAIRS = device_backends(*ON_CPU)
HAS_CPU_KERNEL = "cpu" in BACKENDS
needs_cpu_kernel = pytest.mark.skipif(not HAS_CPU_KERNEL, reason="the compiled extension is not built")


def run(backend, fn, *args, **kwargs):
    """fn(*args, backend=backend, **kwargs); skips when the backend says it cannot serve the inputs."""
    return serve_or_skip(backend, fn, *args, declines=("cpu", "reference", "triton"), **kwargs)


@pytest.mark.parametrize(("device", "backend"), PAIRS)
@pytest.mark.parametrize("case", list(CASES))
def test_float64_outputs_and_gradients(device, backend, case):
    batch, q_heads, kv_heads, L, S, E, Ev, mask_kind, causal = CASES[case]
    q, k, v = (t.requires_grad_() for t in make_inputs(batch, q_heads, kv_heads, L, S, E, Ev))
    mask = make_mask(mask_kind, batch, q_heads, L, S)
    if mask is not None and mask.is_floating_point():
        mask.requires_grad_()
    gqa = q_heads != kv_heads
    ours = run(backend, attnkernels.scaled_dot_product_attention, q, k, v, mask, is_causal=causal, enable_gqa=gqa)
    expected = torch_math(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
    oracle = reference.scaled_dot_product_attention(q, k, v, mask, is_causal=causal, enable_gqa=gqa)
    assert ours.shape == expected.shape and ours.dtype == torch.float64
    assert not ours.isnan().any()
    if mask is not None and mask.dtype == torch.bool and not mask.any(-1).all():
        assert (ours[..., L // 2, :] == 0).all(), "a fully masked row must give 0"
    torch.testing.assert_close(ours, expected, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(ours, oracle, atol=1e-8, rtol=1e-8)
    inputs = (q, k, v, mask)
    ours_grads = gradients(ours, inputs)
    oracle_grads = gradients(oracle, inputs)
    for name, mine, theirs in zip("qkvm", ours_grads, oracle_grads, strict=False):
        assert not mine.isnan().any(), f"NaN in the gradient of {name}"
        torch.testing.assert_close(mine, theirs, atol=1e-8, rtol=1e-8, msg=f"gradient of {name}")
    if mask is None or not mask.is_floating_point() or not torch.isinf(mask).any():
        # torch's math backend gives NaN gradients for rows masked with -inf; compare where it is defined
        torch_grads = gradients(expected, inputs)
        for name, mine, theirs in zip("qkvm", ours_grads, torch_grads, strict=False):
            torch.testing.assert_close(mine, theirs, atol=1e-8, rtol=1e-8, msg=f"gradient of {name} vs torch")


@pytest.mark.parametrize(("device", "backend"), PAIRS)
def test_lse_matches_logsumexp_of_scores(device, backend):
    q, k, v = make_inputs((2,), 2, 2, 9, 13, 8, 8)
    mask = make_mask("float", (2,), 2, 9, 13)
    out, lse = run(backend, attnkernels.attention_with_lse, q, k, v, mask, scale=0.3)
    scores = q @ k.transpose(-2, -1) * 0.3 + mask
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), atol=1e-10, rtol=1e-10)
    assert lse.dtype == torch.float64 and torch.isneginf(lse[..., -1]).all()
    out32, lse32 = run(backend, attnkernels.attention_with_lse, q.float(), k.float(), v.float())
    assert lse32.dtype == torch.float32


@pytest.mark.parametrize(("device", "backend"), PAIRS)
def test_a_call_without_gradients_gives_what_a_recorded_call_gives(device, backend):
    """Calls autograd would not record skip the op's autograd wrapper: the same results, no graph."""
    q, k, v = make_inputs((2,), 2, 2, 9, 13, 8, 8)
    mask = make_mask("float", (2,), 2, 9, 13)
    with torch.no_grad():
        plain = run(backend, attnkernels.attention_with_lse, q, k, v, mask)
    recorded = run(backend, attnkernels.attention_with_lse, q.requires_grad_(), k, v, mask)
    assert recorded[0].grad_fn is not None and plain[0].grad_fn is None
    for mine, theirs in zip(plain, recorded, strict=True):
        assert torch.equal(mine, theirs.detach())


@pytest.mark.parametrize(("device", "backend"), PAIRS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", ["basic", "causal_long", "causal_blocks", "gqa", "float_mask_full", "bool_mask",
                                  "rank3", "rank5", "value_dim"])
def test_low_precision_flash_attention_rule(device, backend, dtype, case):
    """Our error against float64 is at most 2x torch's own in the same dtype (3x for gradients), torch
    taking its own choice of path (its exact math path for rank 3, rank 5 and Ev != E)."""
    if backend == "triton" and case in ("rank3", "rank5", "value_dim"):
        pytest.skip("the Triton kernel rounds the probabilities to the input dtype before P·V, as FlashAttention "
                    "does; against torch's math path (fp32 probabilities) it can exceed 2x in bf16")
    batch, q_heads, kv_heads, L, S, E, Ev, mask_kind, causal = CASES[case]
    q64, k64, v64 = make_inputs(batch, q_heads, kv_heads, L, S, E, Ev)
    mask64 = make_mask(mask_kind, batch, q_heads, L, S)
    gqa = q_heads != kv_heads

    def run_in(dtype, fn):
        q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q64, k64, v64))
        mask = None
        if mask64 is not None:
            mask = mask64 if mask64.dtype == torch.bool else mask64.to(dtype).requires_grad_()
        out = fn(q, k, v, mask)
        return [out, *gradients(out, (q, k, v, mask))]

    ours = run_in(dtype, lambda q, k, v, m: run(backend, attnkernels.scaled_dot_product_attention, q, k, v, m,
                                                 is_causal=causal, enable_gqa=gqa))
    theirs = run_in(dtype, lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, m, is_causal=causal,
                                                                             enable_gqa=gqa))
    exact = run_in(torch.float64, lambda q, k, v, m: torch_math(q, k, v, attn_mask=m, is_causal=causal,
                                                                enable_gqa=gqa))
    for index, (mine, torchs, truth) in enumerate(zip(ours, theirs, exact, strict=True)):
        assert mine.dtype == dtype
        our_error = (mine.double() - truth).abs().max().item()
        torch_error = (torchs.double() - truth).abs().nan_to_num(0).max().item()
        factor = 2 if index == 0 else 3
        floor = 1e-6 if dtype == torch.float32 else 1e-3
        assert our_error <= factor * torch_error + floor, (index, our_error, torch_error)


@needs_cpu_kernel
def test_gradcheck_and_gradgradcheck_float64():
    q, k, v = (t.requires_grad_() for t in make_inputs((1,), 2, 1, 5, 7, 3, 4))
    mask = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)

    def masked(q, k, v, mask):
        return attnkernels.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True, backend="cpu")

    def causal_lse(q, k, v):
        out, lse = attnkernels.attention_with_lse(q, k, v, is_causal=True, enable_gqa=True, backend="cpu")
        return out, lse

    assert torch.autograd.gradcheck(masked, (q, k, v, mask))
    assert torch.autograd.gradcheck(causal_lse, (q, k, v))
    assert torch.autograd.gradgradcheck(masked, (q, k, v, mask))


@needs_cpu_kernel
def test_gradgradcheck_with_dropout():
    q, k, v = (t.requires_grad_() for t in make_inputs((1,), 1, 1, 4, 5, 3, 3))

    def dropped(q, k, v):
        torch.manual_seed(7)  # the same dropout mask at every evaluation
        return attnkernels.scaled_dot_product_attention(q, k, v, dropout_p=0.3, backend="cpu")

    assert torch.autograd.gradcheck(dropped, (q, k, v))
    assert torch.autograd.gradgradcheck(dropped, (q, k, v))


@pytest.mark.parametrize(("device", "backend"), PAIRS)
@pytest.mark.parametrize("where", ["query", "key", "float mask"])
def test_nan_row_gives_nan_lse_and_gradients_like_torch(device, backend, where):
    """A NaN score is not a fully masked row: lse, output and gradients are NaN where torch's are."""
    q, k, v = make_inputs((1,), 1, 1, 2, 3, 4, 2)
    mask = torch.zeros(2, 3, dtype=torch.float64)
    if where == "query":
        q[0, 0, 0, 1] = math.nan
    elif where == "key":
        k[0, 0, 1, 2] = math.nan
    else:
        mask[0, 1] = math.nan
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = run(backend, attnkernels.attention_with_lse, q, k, v, mask)
    expected = torch_math(q, k, v, attn_mask=mask)
    assert torch.equal(lse.isnan(), expected.isnan().all(-1)), lse
    assert torch.equal(out.isnan(), expected.isnan())
    for mine, theirs in zip(gradients(out, (q, k, v)), gradients(expected, (q, k, v)), strict=True):
        assert torch.equal(mine.isnan(), theirs.isnan()), (mine, theirs)
    merged_out, merged_lse = attnkernels.merge_attention([out, out], [lse, lse])
    assert torch.equal(merged_lse.isnan(), lse.isnan()) and torch.equal(merged_out.isnan(), out.isnan())


@pytest.mark.parametrize("where", ["key behind causal", "key behind bool mask", "query of a fully masked row"])
def test_reference_keeps_nan_behind_a_mask_like_torch(where):
    """torch's math path adds its masks, so a NaN score behind a mask still gives NaN (NaN - inf); the
    oracle does too (the kernels: tests/test_attention_hidden_nonfinite.py)."""
    q, k, v = make_inputs((1,), 1, 1, 3, 3, 4, 2)
    mask = torch.tensor([[True, True, False]] * 3)
    kwargs = {"is_causal": True} if where == "key behind causal" else {"attn_mask": mask}
    if where == "query of a fully masked row":
        mask[0] = False
        q[0, 0, 0, 1] = math.nan
    else:
        k[0, 0, 2, 0] = math.nan
    expected = torch_math(q, k, v, **kwargs)
    ours = reference.scaled_dot_product_attention(q, k, v, **kwargs)
    assert torch.equal(ours.isnan(), expected.isnan())
    torch.testing.assert_close(ours.nan_to_num(7.0), expected.nan_to_num(7.0))


@pytest.mark.parametrize(("device", "backend"), PAIRS)
def test_merge_of_halves_equals_whole(device, backend):
    q, k, v = (t.requires_grad_() for t in make_inputs((2,), 2, 2, 9, 20, 8, 6))
    mask = make_mask("float", (2,), 2, 9, 20)
    whole, whole_lse = run(backend, attnkernels.attention_with_lse, q, k, v, mask)
    parts = [run(backend, attnkernels.attention_with_lse, q, k[..., s, :], v[..., s, :], mask[..., s])
             for s in (slice(0, 7), slice(7, 20))]
    merged, merged_lse = attnkernels.merge_attention([p[0] for p in parts], [p[1] for p in parts])
    torch.testing.assert_close(merged, whole, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(merged_lse, whole_lse, atol=1e-10, rtol=1e-10)
    # Gradients flow through the parts' lse (the kernels' grad_lse path).
    for mine, theirs in zip(gradients(merged, (q, k, v)), gradients(whole, (q, k, v)), strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-10, rtol=1e-10)


def test_merge_attention_rejects_mismatched_parts():
    out = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="lses"):
        attnkernels.merge_attention([out, out], [torch.zeros(2, 3)])
    with pytest.raises(RuntimeError, match="outs"):
        attnkernels.merge_attention([out, torch.zeros(2, 3, 5)], [torch.zeros(2, 3), torch.zeros(2, 3)])


# ----------------------------------------------------------------------------- dropout


def dropped_weights(backend, p, seed, L=40, S=50, heads=4):
    """The attention weights after dropout: with value = identity, out = dropout(P) / (1 - p)."""
    q, k, _ = make_inputs((1,), heads, heads, L, S, 8, 8)
    identity = torch.eye(S, dtype=torch.float64).expand(1, heads, S, S)
    torch.manual_seed(seed)
    weights = run(backend, attnkernels.scaled_dot_product_attention, q, k, identity, dropout_p=p)
    probs = reference.scaled_dot_product_attention(q, k, identity)
    return weights, probs


@pytest.mark.parametrize(("device", "backend"), PAIRS)
@pytest.mark.parametrize("p", [0.2, 0.6])
def test_dropout_statistics(device, backend, p):
    weights, probs = dropped_weights(backend, p, seed=11)
    kept = weights != 0
    # Kept weights are P / (1 - p) exactly; the ratio W / P has mean 1 and variance p / (1 - p).
    torch.testing.assert_close(weights[kept], probs[kept] / (1 - p), atol=1e-12, rtol=1e-12)
    n = weights.numel()
    keep_rate = kept.double().mean().item()
    assert abs(keep_rate - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    ratio = weights / probs
    assert abs(ratio.mean().item() - 1) < 5 * math.sqrt(p / (1 - p) / n)
    assert abs(ratio.var().item() / (p / (1 - p)) - 1) < 0.05
    # Decisions are not correlated between neighbouring keys or queries.
    flat = kept.double() - (1 - p)
    for dim in (-1, -2):
        neighbours = (flat * flat.roll(1, dims=dim)).mean().item() / (p * (1 - p))
        assert abs(neighbours) < 0.05


@needs_cpu_kernel
def test_kernel_dropout_mask_mirror_matches_the_kernel():
    p, seed, L, S = 0.4, 3, 40, 50
    weights, _ = dropped_weights("cpu", p, seed, L, S, heads=2)
    assert torch.equal(keep_pattern_after_seed(seed, (1, 2, L, S), p), weights != 0)


# ----------------------------------------------------------------------------- torch integration


@needs_cpu_kernel
def test_opcheck():
    q, k, v = make_inputs((2,), 4, 2, 9, 13, 8, 6, dtype=torch.float32)
    mask = torch.randn(2, 4, 9, 13)
    bool_mask = (torch.rand(9, 13) > 0.3).expand(2, 4, 9, 13)
    seed = torch.tensor([12345], dtype=torch.int64)
    op = torch.ops.attnkernels.attention
    for args in [
        (q, k, v, None, 0.0, False, 0.35, None),
        (q, k, v, None, 0.0, True, 0.35, None),
        (q, k, v, mask.requires_grad_(), 0.0, False, 0.35, None),
        (q, k, v, bool_mask, 0.0, False, 0.35, None),
        (q, k, v, None, 0.25, False, 0.35, seed),
        (q.double(), k.double(), v.double(), None, 0.0, True, 0.35, None),
    ]:
        args = tuple(a.detach().requires_grad_(a.is_floating_point()) if isinstance(a, torch.Tensor) else a
                     for a in args)
        torch.library.opcheck(op, args)
    out, lse = op(q, k, v, mask.detach(), 0.0, False, 0.35, None)
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    torch.library.opcheck(torch.ops.attnkernels.attention_backward,
                          (grad_out, grad_lse, q, k, v, mask.detach(), out, lse, 0.0, False, 0.35, None,
                           [True, True, True, True]))


@needs_cpu_kernel
@pytest.mark.parametrize("masked", (False, True))
def test_eager_autograd_matches_the_registered_autograd(masked):
    """attention_with_lse records the op through the autograd.Function of call_op in eager mode; a
    direct call of the op goes through torch.library's autograd. Same bits through out and lse, to
    first and second order (the double backward of each), and the graph node is the eager Function's."""
    q, k, v = (t.double().requires_grad_() for t in make_inputs((2,), 4, 2, 9, 13, 8, 6))
    mask = torch.randn(2, 4, 9, 13, dtype=torch.float64, requires_grad=True) if masked else None
    leaves = [t for t in (q, k, v, mask) if t is not None]

    def first_and_second_order(attention):
        out, lse = attention()
        grads = torch.autograd.grad((out, lse), leaves, (torch.cos(out), torch.sin(lse)), create_graph=True)
        return (out, lse, *grads, *torch.autograd.grad(sum(g.square().sum() for g in grads), leaves))

    ours = first_and_second_order(lambda: attnkernels.attention_with_lse(q, k, v, mask, scale=0.35, enable_gqa=True,
                                                                backend="cpu"))
    registered = first_and_second_order(
        lambda: torch.ops.attnkernels.attention.default(q, k, v, mask, 0.0, False, 0.35, None))
    for a, b in zip(ours, registered, strict=True):
        assert torch.equal(a, b)
    out, _ = attnkernels.attention_with_lse(q, k, v, mask, enable_gqa=True, backend="cpu")
    assert type(out.grad_fn).__name__ == "Eager_attnkernels_attentionBackward"


@needs_cpu_kernel
def test_torch_compile_fullgraph():
    q, k, v = (t.float().requires_grad_() for t in make_inputs((2,), 4, 2, 9, 13, 8, 8))
    mask = torch.randn(9, 13, requires_grad=True)

    def attention(q, k, v, mask):
        out, lse = attnkernels.attention_with_lse(q, k, v, mask, enable_gqa=True, backend="cpu")
        return out * 2 + lse.unsqueeze(-1)

    compiled = torch.compile(attention, fullgraph=True, backend="aot_eager")
    expected = attention(q, k, v, mask)
    got = compiled(q, k, v, mask)
    torch.testing.assert_close(got, expected)
    for mine, theirs in zip(gradients(got, (q, k, v, mask)), gradients(expected, (q, k, v, mask)), strict=True):
        torch.testing.assert_close(mine, theirs)


@needs_cpu_kernel
def test_torch_compile_inductor_with_dropout():
    q, k, v = (t.float() for t in make_inputs((1,), 2, 2, 9, 13, 8, 8))
    compiled = torch.compile(lambda q, k, v: attnkernels.scaled_dot_product_attention(q, k, v, dropout_p=0.5,
                                                                                      is_causal=True),
                             fullgraph=True)
    torch.manual_seed(0)
    a = compiled(q, k, v)
    torch.manual_seed(0)
    b = compiled(q, k, v)
    assert torch.equal(a, b) and (a == 0).any()


# ----------------------------------------------------------------------------- random shapes


@needs_cpu_kernel
@settings(max_examples=12, deadline=None)
@given(L=st.integers(1, 80), S=st.integers(1, 140), E=st.integers(1, 20), Ev=st.integers(1, 20),
       group=st.sampled_from([1, 2, 3]), causal=st.booleans(), mask_kind=st.sampled_from([None, "bool", "float"]))
def test_random_shapes_match_the_reference(L, S, E, Ev, group, causal, mask_kind):
    if causal:
        mask_kind = None
    q, k, v = (t.requires_grad_() for t in make_inputs((2,), 2 * group, 2, L, S, E, Ev))
    mask = make_mask(mask_kind, (2,), 2 * group, L, S)
    ours = attnkernels.scaled_dot_product_attention(q, k, v, mask, is_causal=causal, enable_gqa=group > 1,
                                                    backend="cpu")
    expected = reference.scaled_dot_product_attention(q, k, v, mask, is_causal=causal, enable_gqa=group > 1)
    torch.testing.assert_close(ours, expected, atol=1e-9, rtol=1e-9)
    for mine, theirs in zip(gradients(ours, (q, k, v)), gradients(expected, (q, k, v)), strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-9, rtol=1e-9)
