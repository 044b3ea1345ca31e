"""NaN and infinity behind an attention mask, on every backend that runs on CPU tensors here.

torch adds a bool mask to the scores as -inf, so a NaN or +inf score behind it still makes its row
NaN (NaN - inf), and a non-finite value row behind it still reaches every row (0 * inf = NaN): the
kernels must not hide them by skipping masked tiles. The sizes put whole kernel tiles behind the
mask (the cpu kernel's forward tiles are 256 x 512, its backward tiles 128 x 256). A causal mask is
different: torch's fused CPU kernel skips the tiles right of the diagonal, so a NaN key there stays
hidden from the rows before it, and so it does here.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import cpu_backends

import attnkernels


def _length(backend: str) -> int:
    """640 > 512: the lower-triangular mask hides whole tiles of the cpu kernel; the Triton kernel
    computes every tile whatever the mask, and the interpreter is slow, so it gets a short one."""
    return 640 if backend == "cpu" else 72


def _inputs(where: str, length: int, dtype=torch.float64):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, length, 4, dtype=dtype, generator=generator) for _ in range(3))
    hidden = length - 1  # the last key: behind the mask for every row but the last
    if where == "key NaN":
        k[0, 1, hidden, 2] = math.nan
    elif where == "key +inf":
        k[0, 1, hidden, 2] = math.inf  # +inf scores for rows with q[..., 2] > 0, -inf for the others
    elif where == "value NaN":
        v[0, 1, hidden, 3] = math.nan
    elif where == "value inf":
        v[0, 0, hidden, 0] = -math.inf
    elif where == "query NaN":
        q[0, 0, 3, 1] = math.nan
    return q, k, v


def _call(backend, q, k, v, **kwargs):
    try:
        return attnkernels.scaled_dot_product_attention(q, k, v, backend=backend, **kwargs)
    except RuntimeError as error:
        if "cannot serve these inputs" in str(error):
            pytest.skip(str(error))
        raise


def _forward_and_gradients(fn, q, k, v):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    grad_out = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    return (out, *torch.autograd.grad(out, (q, k, v), grad_out))


def _assert_same_nan_pattern_and_values(ours, theirs, name):
    assert torch.equal(ours.isnan(), theirs.isnan()), (
        f"{name}: NaN in {int(ours.isnan().sum())} places, torch {int(theirs.isnan().sum())}")
    torch.testing.assert_close(ours.nan_to_num(7.0), theirs.nan_to_num(7.0), atol=1e-9, rtol=1e-9,
                               msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("where", ["key NaN", "key +inf", "value NaN", "value inf", "query NaN"])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_non_finite_behind_a_mask_reaches_the_rows_it_reaches_in_torch(backend, where, kind):
    length = _length(backend)
    q, k, v = _inputs(where, length)
    mask = torch.ones(length, length, dtype=torch.bool).tril()
    if kind == "float":  # -inf where hidden: the same mask as an additive one
        mask = torch.zeros(length, length, dtype=q.dtype).masked_fill(~mask, -math.inf)
    ours = _forward_and_gradients(lambda *t: _call(backend, *t, attn_mask=mask), q, k, v)
    theirs = _forward_and_gradients(lambda *t: F.scaled_dot_product_attention(*t, attn_mask=mask), q, k, v)
    assert theirs[0].isnan().any(), "the case must put a NaN in torch's output"
    for name, mine, reference in zip(("output", "grad q", "grad k", "grad v"), ours, theirs, strict=True):
        _assert_same_nan_pattern_and_values(mine, reference, name)


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b != "reference"])
def test_nan_key_behind_the_causal_mask_stays_hidden_as_in_torch(backend):
    """The rows before a NaN key never see it: only the last row (which attends to it) is NaN, as with
    torch's default CPU kernel (its math path would make every row NaN; the reference follows that)."""
    q, k, v = _inputs("key NaN", _length(backend))
    ours = _call(backend, q, k, v, is_causal=True)
    theirs = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    nan_rows = ours.isnan().any(-1)
    assert nan_rows[0, 1, -1] and not nan_rows[0, 1, :-1].any() and not nan_rows[0, 0].any()
    _assert_same_nan_pattern_and_values(ours, theirs, "output")


def _check_lowest_finite_mask(backend, dtype, device="cpu"):
    length = _length(backend)
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, length, 8, generator=generator).to(device, dtype) for _ in range(3))
    lowest = torch.finfo(dtype).min
    mask = torch.zeros(length, length, dtype=dtype, device=device)
    hidden_rows = length // 8
    mask[:hidden_rows] = lowest  # these rows see only the lowest value
    mask[hidden_rows:, ::3] = lowest
    # torch's fused kernel and its math path disagree on the gradients of the fully hidden rows (lse
    # absorbs log(S) there), so their output gradient is 0: the other rows carry the gradients.
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    grad_out[:, :, :hidden_rows] = 0

    def run(fn, *tensors):
        tensors = [t.detach().clone().requires_grad_() for t in tensors]
        out = fn(*tensors)
        return (out, *torch.autograd.grad(out, tensors, grad_out.to(out.dtype)))

    ours = run(lambda *t: _call(backend, *t, attn_mask=mask), q, k, v)
    theirs = run(lambda *t: F.scaled_dot_product_attention(*t, attn_mask=mask), q, k, v)
    truth = run(lambda *t: F.scaled_dot_product_attention(*t, attn_mask=mask.double()), q.double(), k.double(),
                v.double())
    uniform = v.double().mean(-2)  # what torch gives the fully hidden rows
    torch.testing.assert_close(truth[0][0, :, 0], uniform[0], atol=1e-9, rtol=1e-9)
    for name, mine, reference, exact in zip(("output", "grad q", "grad k", "grad v"), ours, theirs, truth,
                                            strict=True):
        assert not mine.isnan().any(), name
        # The FlashAttention rule: our error against float64 at most twice torch's own, plus rounding.
        our_error = (mine.double() - exact).abs().max().item()
        torch_error = (reference.double() - exact).abs().max().item()
        assert our_error <= 2 * torch_error + 1e-5 * exact.abs().max().item() + 1e-12, (
            f"{name}: error {our_error:.3g}, torch {torch_error:.3g}")


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_a_mask_at_the_lowest_finite_value_hides_as_in_torch(backend, dtype):
    """A float mask of torch.finfo(dtype).min (how many models hide keys) is finite: a row hidden
    entirely by it attends to every key uniformly in torch, not to nothing, and a partly hidden row
    attends to the rest. Kernels that convert scores to other units (base 2) must not overflow it to
    -inf. Rows of both kinds, in every tile the cpu kernel makes (L = 640 > its 512-key blocks)."""
    _check_lowest_finite_mask(backend, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_mask_at_the_lowest_finite_value_on_the_gpu(backend, dtype):
    _check_lowest_finite_mask(backend, dtype, device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("where", ["key NaN", "query NaN", "value NaN"])
def test_non_finite_behind_a_bool_mask_on_the_gpu(backend, where):
    """The GPU kernels in half precision: NaN rows, and NaN (not -inf) log-sum-exp, where torch has them."""
    q, k, v = (t.to("cuda", torch.float16) for t in _inputs(where, 300, torch.float32))
    mask = torch.ones(300, 300, dtype=torch.bool, device="cuda").tril()
    try:
        out, lse = attnkernels.attention_with_lse(q, k, v, mask, backend=backend)
    except RuntimeError as error:
        if "cannot serve these inputs" in str(error):
            pytest.skip(str(error))
        raise
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(out.isnan(), expected.isnan())
    assert torch.equal(lse.isnan(), expected.isnan().all(-1))
