"""The Triton attention kernels (FlashAttention-2 style) against torch and a float64 computation from the math.

Runs on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1, how CI runs it) or on
CUDA tensors on a GPU; GPU-only checks (opcheck, inductor, long sequences) carry the `cuda`
marker. Shapes stay small: every tile operation is a numpy call under the interpreter.
The masked-row, NaN, layout, dropout-mask and empty-input checks, the same on every device, are
in tests/test_attention_devices.py.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from backends import triton_device_or_skip_module
from hypothesis import given, settings
from hypothesis import strategies as st

import attnkernels

DEVICE = triton_device_or_skip_module()
INTERPRETER = DEVICE == "cpu"

import attnkernels.triton as triton_backend  # noqa: E402  (imports triton: only after the skips)
from attnkernels.triton import attention_op  # noqa: E402

pytestmark = pytest.mark.triton  # selected by the GPU check (scripts/gpu_check.sh)

# The triton attention serves float64 only under the interpreter (why_not refuses it on CUDA, see
# test_why_not). On a GPU the tests written against the float64 math run in float32, whose products
# the kernels compute in IEEE float32 (not TF32), with a float32 tolerance.
EXACT = torch.float64 if INTERPRETER else torch.float32
# check_dtype=False: on a GPU float32 results are compared with the float64 math.
EXACT_TOL = dict(rtol=0, atol=1e-10) if INTERPRETER else dict(rtol=2e-5, atol=2e-5, check_dtype=False)
needs_float64 = pytest.mark.skipif(
    not INTERPRETER,
    reason="gradcheck needs float64, which the triton attention serves only under the interpreter (test_why_not)")


def math_attention(q, k, v, mask=None, causal=False, scale=None, keep=None, dropout_p=0.0):
    """softmax(q kᵀ · scale + mask) v in float64, written from the definition (GQA by repeating KV
    heads); a fully masked row gives 0. ``keep``: the dropout mask, kept weights scaled by 1/(1-p)."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[-3] // k.shape[-3]
    k = k.repeat_interleave(group, -3)
    v = v.repeat_interleave(group, -3)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q @ k.transpose(-1, -2) * scale
    if causal:
        L, S = s.shape[-2:]
        s = s.masked_fill(~torch.ones(L, S, dtype=torch.bool, device=s.device).tril(), float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    if keep is not None:
        p = p * keep / (1 - dropout_p)
    return p @ v, lse


def ours(q, k, v, mask=None, causal=False, scale=None, dropout_p=0.0):
    return triton_backend.attention(q, k, v, mask, dropout_p, causal, scale, k.shape[-3] != q.shape[-3])


def randn(*shape, dtype=EXACT, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(DEVICE, dtype)


def with_grads(fn, primals, seed=7):
    """Outputs (out, lse) and the gradients of <out, g_out> + <lse, g_lse> to the primals."""
    leaves = [p.detach().requires_grad_(True) for p in primals]
    out, lse = fn(*leaves)
    gen = torch.Generator().manual_seed(seed)
    g_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
    g_lse = torch.randn(lse.shape, generator=gen, dtype=torch.float64).to(lse.device, lse.dtype)
    finite = torch.isfinite(lse)
    loss = (out * g_out).sum() + torch.where(finite, lse * g_lse, 0).sum()
    return (out, lse, *torch.autograd.grad(loss, leaves, allow_unused=True))


# (batch dims, Hq, Hkv, L, S, E, Ev, causal): odd lengths, head dims that are not powers of two,
# L != S both ways, Ev != E, GQA, no batch dims, two batch dims, a single row and column.
SHAPES = [
    ((2,), 2, 2, 17, 23, 8, 8, False),
    ((2,), 2, 2, 17, 23, 8, 8, True),
    ((1,), 4, 2, 33, 20, 24, 40, True),
    ((), 3, 1, 5, 40, 72, 12, False),
    ((2, 2), 2, 2, 18, 18, 3, 5, True),
    ((1,), 1, 1, 1, 1, 16, 16, True),
]


def shape_id(shape):
    batch, hq, hkv, L, S, E, Ev, causal = shape
    return f"b{'x'.join(map(str, batch)) or '-'}-h{hq}/{hkv}-L{L}-S{S}-E{E}-Ev{Ev}{'-causal' if causal else ''}"


def make_qkv(shape, dtype=EXACT):
    batch, hq, hkv, L, S, E, Ev, _ = shape
    return (randn(*batch, hq, L, E, dtype=dtype, seed=1), randn(*batch, hkv, S, E, dtype=dtype, seed=2),
            randn(*batch, hkv, S, Ev, dtype=dtype, seed=3))


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_exact_dtype_matches_math_and_torch(shape):
    causal = shape[-1]
    q, k, v = make_qkv(shape)
    got = with_grads(lambda a, b, c: ours(a, b, c, causal=causal), (q, k, v))
    expected = with_grads(lambda a, b, c: math_attention(a, b, c, causal=causal), (q, k, v))
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, expected, strict=True):
        torch.testing.assert_close(a, b, **EXACT_TOL, msg=lambda m, n=name: f"{n} vs math: {m}")
    gqa = k.shape[-3] != q.shape[-3]
    qt, kt, vt = (t.detach().requires_grad_(True) for t in (q, k, v))
    theirs = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, enable_gqa=gqa)
    torch.testing.assert_close(got[0], theirs, **EXACT_TOL)
    g_out = torch.randn(theirs.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    g_out = g_out.to(DEVICE, EXACT)
    grads = torch.autograd.grad(theirs, (qt, kt, vt), g_out)
    ours_only_out = with_grads(out_only(lambda a, b, c: ours(a, b, c, causal=causal)), (q, k, v))
    for a, b in zip(ours_only_out[2:], grads, strict=True):
        torch.testing.assert_close(a, b, **EXACT_TOL)


def out_only(fn):
    """``fn`` returning (out, lse) turned into one returning (out, empty): gradients of the output alone."""
    def wrapped(*args):
        return fn(*args)[0], torch.zeros(0, device=DEVICE)
    return wrapped


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[2]], ids=shape_id)
def test_low_precision_within_twice_torch_error(dtype, shape):
    """FlashAttention's rule: our error against float64 at most 2x torch's own in the same dtype
    (3x for gradients), plus one unit in the last place at the output's scale."""
    causal = shape[-1]
    q64, k64, v64 = make_qkv(shape)
    gqa = k64.shape[-3] != q64.shape[-3]
    truth = with_grads(out_only(lambda a, b, c: math_attention(a, b, c, causal=causal)), (q64, k64, v64))
    low = [t.to(dtype) for t in (q64, k64, v64)]
    got = with_grads(out_only(lambda a, b, c: ours(a, b, c, causal=causal)), low)
    theirs = with_grads(out_only(lambda a, b, c: (F.scaled_dot_product_attention(a, b, c, is_causal=causal,
                                                                                 enable_gqa=gqa), None)), low)
    for i, name in ((0, "out"), (2, "dq"), (3, "dk"), (4, "dv")):
        assert got[i].dtype == dtype
        factor = 2 if i == 0 else 3
        ours_err = (got[i].double() - truth[i]).abs().max().item()
        torch_err = (theirs[i].double() - truth[i]).abs().max().item()
        ulp = torch.finfo(dtype).eps * max(1.0, truth[i].abs().max().item())
        assert ours_err <= factor * torch_err + ulp, f"{name}: {ours_err:.3g} vs torch's {torch_err:.3g}"
    _, lse = ours(*low, causal=causal)
    assert lse.dtype == torch.float32
    lse_truth = math_attention(q64, k64, v64, causal=causal)[1]
    torch.testing.assert_close(lse.double(), lse_truth, rtol=0, atol=1e-5 if dtype == torch.float32 else 3e-2)


def test_bool_masks_broadcast_and_fully_masked_rows():
    q, k, v = randn(2, 3, 19, 16), randn(2, 3, 21, 16, seed=1), randn(2, 3, 21, 16, seed=2)
    gen = torch.Generator().manual_seed(4)
    for mask_shape in ((19, 21), (1, 1, 19, 21), (2, 1, 1, 21), (3, 19, 1)):
        mask = (torch.rand(mask_shape, generator=gen) > 0.4).to(DEVICE)
        if mask_shape[-2] == 19:
            mask[..., 3, :] = False  # a fully masked row: output 0, lse -inf, no NaN in gradients
        got = with_grads(lambda a, b, c, m=mask: ours(a, b, c, m), (q, k, v))
        expected = with_grads(lambda a, b, c, m=mask: math_attention(a, b, c, m), (q, k, v))
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, expected, strict=True):
            torch.testing.assert_close(a, b, **EXACT_TOL, msg=lambda m, n=name, s=mask_shape: f"{s} {n}: {m}")
        # torch's CUDA SDPA refuses a mask broadcast along the keys ("last dimension must be
        # contiguous"): it gets the same mask, materialised. The fully masked row is left out of
        # this comparison (torch's backends disagree on it: 0 or NaN); it is checked below.
        full_mask = mask.expand(2, 3, 19, 21).contiguous()
        theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=full_mask)
        seen = full_mask.any(-1)
        torch.testing.assert_close(got[0][seen], theirs[seen], **EXACT_TOL)
        if mask_shape[-2] == 19:
            assert not got[0][..., 3, :].any() and torch.isneginf(got[1][..., 3]).all()


def test_float_mask_gradient_through_broadcasting():
    q, k, v = randn(2, 3, 9, 8), randn(2, 3, 11, 8, seed=1), randn(2, 3, 11, 6, seed=2)
    for mask_shape in ((3, 1, 11), (2, 3, 9, 11), (9, 11)):
        mask = randn(*mask_shape, seed=5)
        mask[..., 0] = float("-inf")  # -inf entries in a float mask are allowed
        got = with_grads(lambda a, b, c, m: ours(a, b, c, m, scale=0.3), (q, k, v, mask))
        expected = with_grads(lambda a, b, c, m: math_attention(a, b, c, m, scale=0.3), (q, k, v, mask))
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv", "dmask"), got, expected, strict=True):
            torch.testing.assert_close(a, b, **EXACT_TOL, msg=lambda m, n=name, s=mask_shape: f"{s} {n}: {m}")


@needs_float64
def test_gradcheck_float64():
    q, k, v = randn(1, 2, 5, 4), randn(1, 1, 6, 4, seed=1), randn(1, 1, 6, 3, seed=2)
    mask = randn(2, 5, 1, seed=3)
    leaves = [t.requires_grad_(True) for t in (q, k, v, mask)]

    def fn(a, b, c, m):
        out, lse = ours(a, b, c, m)
        return out, lse

    def causal(a, b, c):
        return ours(a, b, c, causal=True)

    def dropped(a, b, c):
        torch.manual_seed(0)  # the same dropout mask at every evaluation
        return ours(a, b, c, dropout_p=0.3)

    assert torch.autograd.gradcheck(fn, leaves, fast_mode=True)
    assert torch.autograd.gradcheck(causal, leaves[:3], fast_mode=True)
    assert torch.autograd.gradcheck(dropped, leaves[:3], fast_mode=True)


@needs_float64
def test_gradgradcheck_float64():
    """Double backward (through the reference) with GQA, a float mask with a gradient, and causal."""
    q, k, v = randn(1, 2, 4, 3), randn(1, 1, 5, 3, seed=1), randn(1, 1, 5, 2, seed=2)
    mask = randn(2, 4, 1, seed=3)
    leaves = [t.requires_grad_(True) for t in (q, k, v, mask)]
    assert torch.autograd.gradgradcheck(lambda a, b, c, m: ours(a, b, c, m), leaves, fast_mode=True)
    assert torch.autograd.gradgradcheck(lambda a, b, c: ours(a, b, c, causal=True)[0], leaves[:3], fast_mode=True)

    def dropped(a, b, c):
        torch.manual_seed(0)  # the same dropout mask at every evaluation
        return ours(a, b, c, dropout_p=0.5)[0]

    # The double backward rebuilds the kernels' Philox mask (attention_op.dropout_mask).
    assert torch.autograd.gradgradcheck(dropped, leaves[:3], fast_mode=True)


def dropout_mask(shape, p, seed):
    """The kept positions, read back through the kernel: with q = k = 0 every weight is 1/S, and
    v = identity puts weight (i, j) at out[i, j]."""
    batch, hq, hkv, L, S = shape
    q = torch.zeros(*batch, hq, L, 16, device=DEVICE)
    k = torch.zeros(*batch, hkv, S, 16, device=DEVICE)
    v = torch.eye(S, device=DEVICE).expand(*batch, hkv, S, S)
    torch.manual_seed(seed)
    out, _ = triton_backend.attention(q, k, v, None, p, False, None, hq != hkv)
    return out > 0, out


def test_dropout_mask_rebuilds_the_kernels_mask():
    """The double backward's mask is the one the kernels drew (GQA, lengths not multiples of a block)."""
    p = 0.4
    keep, _ = dropout_mask(((2,), 2, 1, 37, 45), p, seed=5)
    torch.manual_seed(5)  # the seed the attention call drew
    kernel_seed = int(torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=DEVICE))
    rebuilt = attention_op.dropout_mask(kernel_seed, (2, 2, 37, 45), p, torch.device(DEVICE))
    assert rebuilt.dtype == torch.bool and torch.equal(rebuilt, keep.reshape(2, 2, 37, 45))


def test_dropout_statistics_scaling_and_determinism():
    p = 0.3
    keep, out = dropout_mask(((2,), 2, 2, 64, 96), p, seed=1)
    fraction = keep.double().mean().item()
    # 24576 Bernoulli(0.7) draws: 5 standard deviations is 0.015.
    assert abs(fraction - (1 - p)) < 0.015, fraction
    torch.testing.assert_close(out[keep], torch.full_like(out[keep], 1 / (96 * (1 - p))))
    # Rows, columns and heads draw independent numbers: no two rows share a pattern.
    rows = keep.reshape(-1, 96)
    assert torch.unique(rows, dim=0).shape[0] == rows.shape[0]
    again, _ = dropout_mask(((2,), 2, 2, 64, 96), p, seed=1)
    other, _ = dropout_mask(((2,), 2, 2, 64, 96), p, seed=2)
    assert torch.equal(keep, again) and not torch.equal(keep, other)
    everything, out = dropout_mask(((1,), 1, 1, 5, 7), 1.0, seed=1)
    assert not everything.any() and torch.isfinite(out).all()


@settings(max_examples=6, deadline=None)
@given(L=st.integers(1, 40), S=st.integers(1, 40), E=st.integers(1, 40), Ev=st.integers(1, 40),
       group=st.sampled_from([1, 2]), causal=st.booleans())
def test_random_shapes(L, S, E, Ev, group, causal):
    q, k, v = randn(1, 2 * group, L, E), randn(1, 2, S, E, seed=1), randn(1, 2, S, Ev, seed=2)
    got = with_grads(lambda a, b, c: ours(a, b, c, causal=causal), (q, k, v))
    expected = with_grads(lambda a, b, c: math_attention(a, b, c, causal=causal), (q, k, v))
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, **EXACT_TOL)


def test_why_not():
    q = randn(1, 2, 4, 8, dtype=torch.float16)
    assert triton_backend.why_not("attention", q, dtype=q.dtype, head_dim=8, value_dim=8, has_mask=True,
                                  dropout=True, unknown_detail=3) is None
    assert "int32" in triton_backend.why_not("attention", q.int(), dtype=torch.int32, head_dim=8)
    assert "meta" in triton_backend.why_not("attention", q.to("meta"), dtype=q.dtype, head_dim=8)
    assert "no flash_decoding kernel" in triton_backend.why_not("flash_decoding", q)
    if DEVICE == "cuda":
        reason = triton_backend.why_not("attention", q.cuda(), dtype=q.dtype, head_dim=1000, value_dim=8)
        assert "head_dim up to 512" in reason
        double = q.cuda().double()
        assert "float64 only under the Triton interpreter" in triton_backend.why_not("attention", double,
                                                                                     dtype=torch.float64, head_dim=8)
    else:
        assert triton_backend.why_not("attention", q.double(), dtype=torch.float64, head_dim=8) is None


@pytest.mark.parametrize("kind", ("forward", "kv", "q"))
def test_gpu_autotune_configs_are_pruned_to_what_fits(kind):
    """The GPU config list (checked here without a GPU): every head dim up to the limit keeps at
    least one config, every kept config fits, and short sequences drop tiles far longer than them."""
    module = importlib.import_module("attnkernels.triton.attention")  # the package's `attention` is the function

    configs = module._configs("forward" if kind == "forward" else "backward", interpreter=False)
    prune = module._pruner(kind)
    for elem, dtype in ((2, torch.float16), (4, torch.float32), (8, torch.float64)):
        for head_dim in (16, 64, 128, 256, module.MAX_HEAD_DIM):
            args = {"Q": torch.empty(0, dtype=dtype), "BLOCK_E": head_dim, "BLOCK_EV": head_dim,
                    "L_BUCKET": 4096, "S_BUCKET": 4096}
            kept = prune(configs, args)
            assert kept, (elem, head_dim)
            fitting = [c for c in kept if module._fits(kind, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps,
                                                       c.num_stages, head_dim, head_dim, elem)]
            assert fitting == kept or len(kept) == 1
        short = prune(configs, {"Q": torch.empty(0, dtype=dtype), "BLOCK_E": 64, "BLOCK_EV": 64,
                                "L_BUCKET": 16, "S_BUCKET": 16})
        assert all(c.kwargs["BLOCK_M"] <= 32 and c.kwargs["BLOCK_N"] <= 32 for c in short)
    if kind == "forward":  # the Triton tutorial's choice for head dim 128 in 16-bit survives
        kept = prune(configs, {"Q": torch.empty(0, dtype=torch.float16), "BLOCK_E": 128, "BLOCK_EV": 128,
                               "L_BUCKET": 4096, "S_BUCKET": 4096})
        assert any((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) == (128, 64, 8) for c in kept)


def test_torch_compile_fullgraph():
    """torch.compile sees the triton_ops (eager backend: inductor needs a GPU, see the cuda test)."""
    q, k, v = randn(1, 2, 9, 8, dtype=torch.float32), randn(1, 2, 11, 8, seed=1, dtype=torch.float32), \
        randn(1, 2, 11, 8, seed=2, dtype=torch.float32)
    mask = torch.rand(9, 11, generator=torch.Generator().manual_seed(0)).to(DEVICE) > 0.3

    def fn(a, b, c):
        out, lse = triton_backend.attention(a, b, c, mask, 0.0, False, None, False)
        return out.sum() + lse.sum()

    qg = q.requires_grad_(True)
    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    got = compiled(qg, k, v)
    torch.testing.assert_close(got, fn(qg, k, v))
    (grad,) = torch.autograd.grad(got, qg)
    (expected,) = torch.autograd.grad(fn(qg, k, v), qg)
    torch.testing.assert_close(grad, expected)


def test_public_api_with_the_triton_backend():
    """Through attnkernels.scaled_dot_product_attention once the public attention API exists."""
    sdpa = getattr(attnkernels, "scaled_dot_product_attention", None)
    if sdpa is None:
        pytest.skip("attnkernels.scaled_dot_product_attention is not in this tree yet")
    q, k, v = randn(2, 4, 9, 8), randn(2, 2, 12, 8, seed=1), randn(2, 2, 12, 8, seed=2)
    mask = randn(9, 12, seed=3)
    got = sdpa(q, k, v, attn_mask=mask, enable_gqa=True, backend="triton")
    torch.testing.assert_close(got, math_attention(q, k, v, mask)[0], **EXACT_TOL)


# ----------------------------------------------------------------------------- GPU only


@pytest.mark.cuda
def test_opcheck_on_gpu():
    q, k, v = (torch.randn(1, 2, 70, 40, device="cuda", requires_grad=True) for _ in range(3))
    mask = torch.randn(70, 70, device="cuda").expand(1, 2, 70, 70)
    seed = torch.tensor([5], device="cuda")
    torch.library.opcheck(torch.ops.attnkernels.triton_attention, (q, k, v, mask, 0.0, False, 0.2, None))
    torch.library.opcheck(torch.ops.attnkernels.triton_attention, (q, k, v, None, 0.1, True, 0.2, seed))


@pytest.mark.cuda
def test_inductor_compile_on_gpu():
    q, k, v = (torch.randn(2, 4, 300, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))

    def fn(a, b, c):
        return triton_backend.attention(a, b, c, None, 0.0, True, None, False)[0]

    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(q, k, v), fn(q, k, v))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("head_dim", (64, 128, 96, 200))
def test_long_sequences_on_gpu(dtype, head_dim):
    """L = S = 2048 (and a ragged 1999 x 2100), causal and not, errors within 2x (3x for gradients) of torch's."""
    for L, S, causal in ((2048, 2048, True), (1999, 2100, False)):
        q = torch.randn(2, 8, L, head_dim, device="cuda", dtype=torch.float64)
        k = torch.randn(2, 8, S, head_dim, device="cuda", dtype=torch.float64)
        v = torch.randn(2, 8, S, head_dim, device="cuda", dtype=torch.float64)

        def sdpa(a, b, c, causal=causal):
            return F.scaled_dot_product_attention(a, b, c, is_causal=causal), None

        truth = with_grads(out_only(sdpa), (q, k, v))
        low = [t.to(dtype) for t in (q, k, v)]
        theirs = with_grads(out_only(sdpa), low)
        got = with_grads(out_only(lambda a, b, c, causal=causal: ours(a, b, c, causal=causal)), low)
        for i in (0, 2, 3, 4):
            factor = 2 if i == 0 else 3
            ulp = torch.finfo(dtype).eps * max(1.0, truth[i].abs().max().item())
            ours_err = (got[i].double() - truth[i]).abs().max().item()
            torch_err = (theirs[i].double() - truth[i]).abs().max().item()
            assert ours_err <= factor * torch_err + ulp, (L, S, causal, i, ours_err, torch_err)
