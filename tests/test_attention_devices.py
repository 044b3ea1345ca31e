"""Attention's masked-row, NaN, layout, dropout and empty-input checks, written once for every
(device, backend) pair: CPU tensors on the cpu, reference and triton backends, CUDA tensors on the
cuda and triton backends (the `cuda` mark; skipped without a GPU).

Each pair runs in the dtype its backend serves there, and its results are compared with the
float64 reference computed from the same (rounded) inputs, within that dtype's tolerance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from backends import ON_CPU, device_backends, serve_or_skip

import attnkernels
from attnkernels import reference

PAIRS = device_backends(*ON_CPU, ("cuda", "cuda"), ("cuda", "triton"))


@dataclass(frozen=True)
class Precision:
    dtype: torch.dtype
    tolerance: float  # allowed max |ours - float64 reference|, relative to max(1, max |reference|)


def precision(device: str, backend: str) -> Precision:
    if device == "cpu":
        return Precision(torch.float64, 1e-10)
    if backend == "triton":  # on CUDA tensors the triton kernels serve no float64; IEEE float32 products
        return Precision(torch.float32, 2e-5)
    return Precision(torch.bfloat16, 5e-2)  # the cuda kernel serves 16-bit dtypes only


def run(backend, fn, *args, **kwargs):
    """fn(*args, backend=backend, **kwargs); skips when the backend says it cannot serve the inputs."""
    return serve_or_skip(backend, fn, *args, declines=("cpu", "reference", "triton", "cuda"), **kwargs)


def randn(*shape, device, dtype, seed):
    """Standard normal values drawn in float64 on the CPU (the same on every device), then cast."""
    values = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return values.to(device, dtype)


def assert_near(ours, truth, prec, what=""):
    """ours within the pair's tolerance of the float64 ``truth``; NaN where truth is NaN."""
    truth = truth.double()
    assert torch.equal(ours.isnan(), truth.isnan()), what
    error = (ours.double() - truth).nan_to_num(0).abs().max().item() if ours.numel() else 0.0
    scale = max(1.0, truth.nan_to_num(0).abs().max().item()) if ours.numel() else 1.0
    assert error <= prec.tolerance * scale, (what, error, prec.tolerance * scale)


def grads_of(out, leaves, seed=3):
    """Gradients of the leaves for a fixed random output gradient (drawn in float64, then cast)."""
    grad_out = randn(*out.shape, device=out.device, dtype=out.dtype, seed=seed)
    return torch.autograd.grad(out, leaves, grad_out)


def as_float64(*tensors):
    return [t.detach().double().requires_grad_(t.requires_grad) for t in tensors]


# ----------------------------------------------------------------------------- masked rows, NaN


@pytest.mark.parametrize(("device", "backend"), PAIRS)
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_fully_masked_rows_give_zero_output_and_gradient(device, backend, kind):
    prec = precision(device, backend)
    L = S = 40
    q, k, v = (randn(1, 2, n, 16, device=device, dtype=prec.dtype, seed=s).requires_grad_()
               for s, n in ((0, L), (1, S), (2, S)))
    keep = torch.rand(L, S, generator=torch.Generator().manual_seed(4)) > 0.3
    keep[3] = False  # a fully masked row
    keep[:, 5] = False  # a fully masked key
    keep = keep.to(device)
    if kind == "bool":
        mask = keep
    else:
        mask = torch.zeros(L, S, dtype=prec.dtype, device=device).masked_fill(~keep, -math.inf).requires_grad_()
    out, lse = run(backend, attnkernels.attention_with_lse, q, k, v, mask)
    assert (out[..., 3, :] == 0).all() and torch.isneginf(lse[..., 3]).all()
    leaves = [q, k, v] + ([mask] if kind == "float" else [])
    grads = grads_of(out, leaves)
    for grad in grads:
        assert not grad.isnan().any()
    grad_q, grad_k, grad_v = grads[:3]
    assert (grad_q[..., 3, :] == 0).all() and (grad_k[..., 5, :] == 0).all() and (grad_v[..., 5, :] == 0).all()
    if kind == "float":
        assert (grads[3][3] == 0).all() and (grads[3][:, 5] == 0).all()
    exact = as_float64(q, k, v)
    assert_near(out, reference.scaled_dot_product_attention(*exact, keep), prec, "out")
    everything_masked = torch.zeros(L, S, dtype=torch.bool, device=device)
    assert (run(backend, attnkernels.scaled_dot_product_attention, q, k, v, everything_masked) == 0).all()


@pytest.mark.parametrize(("device", "backend"), PAIRS)
def test_nan_and_inf_stay_in_their_rows(device, backend):
    prec = precision(device, backend)
    q, k, v = (randn(1, 1, 20, 16, device=device, dtype=prec.dtype, seed=s) for s in range(3))
    q[0, 0, 1, 0] = math.nan
    out = run(backend, attnkernels.scaled_dot_product_attention, q, k, v)
    assert out[0, 0, 1].isnan().all()  # like torch's math backend
    keep = [0, *range(2, 20)]
    assert_near(out[..., keep, :], reference.scaled_dot_product_attention(*as_float64(q[..., keep, :], k, v)), prec)
    mask = torch.zeros(20, 20, dtype=prec.dtype, device=device)
    mask[:, 2] = math.inf  # +inf scores: NaN, as in torch
    assert run(backend, attnkernels.scaled_dot_product_attention, q, k, v, mask)[0, 0, 0].isnan().all()


# ----------------------------------------------------------------------------- layouts, empty inputs


@pytest.mark.parametrize(("device", "backend"), PAIRS)
@pytest.mark.parametrize("causal", [False, True], ids=["float_mask", "causal"])
def test_non_contiguous_inputs_and_gradients(device, backend, causal):
    """(B, L, H, E) memory seen as (B, H, L, E), the layout of most models; a value with a strided last
    dim, a transposed mask and a transposed grad_out: the results are those of contiguous copies."""
    prec = precision(device, backend)
    B, H, L, S, E, Ev = 2, 3, 13, 15, 16, 8
    q = randn(B, L, H, E, device=device, dtype=prec.dtype, seed=0).transpose(1, 2)
    k = randn(B, S, H, E, device=device, dtype=prec.dtype, seed=1).transpose(1, 2)
    v = randn(B, S, H, 2 * Ev, device=device, dtype=prec.dtype, seed=2)[..., ::2].transpose(1, 2)
    mask = None if causal else randn(B, H, S, L, device=device, dtype=prec.dtype, seed=3).transpose(-1, -2)
    grad_out = randn(B, Ev, H, L, device=device, dtype=prec.dtype, seed=4).permute(0, 2, 3, 1)
    assert not q.is_contiguous() and not v.is_contiguous() and not grad_out.is_contiguous()
    primals = [q, k, v] + ([] if causal else [mask])

    def forward_and_grads(fn, tensors, g):
        leaves = [t.detach().requires_grad_() for t in tensors]
        out = fn(*leaves)
        return [out, *torch.autograd.grad(out, leaves, g)]

    def ours(*t):
        return run(backend, attnkernels.scaled_dot_product_attention, *t, is_causal=causal)

    strided = forward_and_grads(ours, primals, grad_out)
    contiguous = forward_and_grads(ours, [t.contiguous() for t in primals], grad_out.contiguous())
    exact = forward_and_grads(lambda *t: reference.scaled_dot_product_attention(*t, is_causal=causal),
                              as_float64(*primals), grad_out.double())
    # The compiled kernels give the same bits whatever the strides; the reference and the Triton
    # kernels (whose sums follow the memory order) agree with themselves to rounding.
    same_bits = backend in ("cpu", "cuda")
    for name, mine, same, truth in zip(["out", "dq", "dk", "dv", "dmask"], strided, contiguous, exact, strict=False):
        if same_bits:
            torch.testing.assert_close(mine, same, atol=0, rtol=0, msg=name)
        else:
            assert_near(mine, same, prec, name)
        assert_near(mine, truth, prec, name)


@pytest.mark.parametrize(("device", "backend"), PAIRS)
def test_empty_inputs(device, backend):
    prec = precision(device, backend)
    q, k, v = (randn(2, 2, n, e, device=device, dtype=prec.dtype, seed=s) for s, n, e in ((0, 3, 16), (1, 5, 16),
                                                                                          (2, 5, 8)))
    no_queries = [q[:, :, :0].detach().requires_grad_(), k.detach().requires_grad_(), v.detach().requires_grad_()]
    out, lse = run(backend, attnkernels.attention_with_lse, *no_queries)
    assert out.shape == (2, 2, 0, 8) and lse.shape == (2, 2, 0)
    grads = torch.autograd.grad(out.sum(), no_queries)  # no query attends to the keys: their gradients are 0
    assert grads[0].shape == (2, 2, 0, 16) and (grads[1] == 0).all() and (grads[2] == 0).all()
    leaves = [q.requires_grad_(), k[:, :, :0].detach().requires_grad_(), v[:, :, :0].detach().requires_grad_()]
    out, lse = run(backend, attnkernels.attention_with_lse, *leaves)
    assert out.shape == (2, 2, 3, 8) and (out == 0).all() and torch.isneginf(lse).all()
    grads = torch.autograd.grad(out.sum(), leaves)
    assert (grads[0] == 0).all() and grads[1].shape == leaves[1].shape and grads[2].shape == leaves[2].shape
    no_batch = run(backend, attnkernels.scaled_dot_product_attention, q[:0].detach(), k[:0], v[:0])
    assert no_batch.shape == (0, 2, 3, 8)


# ----------------------------------------------------------------------------- dropout


def dropped_weights(backend, prec, device, p, seed, causal, L=40, S=50, heads=(4, 2)):
    """The attention weights after dropout: with value = identity, out = dropout(P) / (1 - p)."""
    q_heads, kv_heads = heads
    q = randn(1, q_heads, L, 16, device=device, dtype=prec.dtype, seed=0)
    k = randn(1, kv_heads, S, 16, device=device, dtype=prec.dtype, seed=1)
    identity = torch.eye(S, dtype=prec.dtype, device=device).expand(1, kv_heads, S, S)
    torch.manual_seed(seed)
    return run(backend, attnkernels.scaled_dot_product_attention, q, k, identity, dropout_p=p, is_causal=causal,
               enable_gqa=q_heads != kv_heads)


@pytest.mark.parametrize(("device", "backend"), PAIRS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_dropout_same_seed_same_mask_and_the_backward_uses_it(device, backend, causal):
    prec = precision(device, backend)
    p, seed, L, S = 0.3, 21, 40, 50
    first = dropped_weights(backend, prec, device, p, seed, causal, L, S)
    again = dropped_weights(backend, prec, device, p, seed, causal, L, S)
    other = dropped_weights(backend, prec, device, p, seed + 1, causal, L, S)
    assert torch.equal(first, again) and not torch.equal(first, other)
    keep = first != 0
    q, k, v = (randn(1, h, n, 16, device=device, dtype=prec.dtype, seed=s).requires_grad_()
               for s, h, n in ((0, 4, L), (1, 2, S), (2, 2, S)))
    torch.manual_seed(seed)
    ours = run(backend, attnkernels.scaled_dot_product_attention, q, k, v, dropout_p=p, is_causal=causal,
               enable_gqa=True)
    exact = as_float64(q, k, v)
    truth = reference.scaled_dot_product_attention(*exact, dropout_p=p, is_causal=causal, enable_gqa=True,
                                                   dropout_mask=keep)
    grad_out = randn(*ours.shape, device=device, dtype=torch.float64, seed=3)
    mine = [ours, *torch.autograd.grad(ours, (q, k, v), grad_out.to(prec.dtype))]
    theirs = [truth, *torch.autograd.grad(truth, exact, grad_out)]
    for name, m, t in zip(["out", "dq", "dk", "dv"], mine, theirs, strict=True):
        assert_near(m, t, prec, name)
