"""Inputs torch's functions accept are served the way torch serves them (issue 14, item 5).

Attention: 2-D q/k/v, batch and head dimensions that broadcast, enable_gqa with key and value of
different head counts, dropout_p of 1, a bool or a 0-d tensor, a numpy scale. Every op under
torch.func.grad and jacrev. Under patch_torch none of these falls back to torch's op.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import cpu_backends
from torch.nn.attention import SDPBackend, sdpa_kernel

import attnkernels

BACKENDS = cpu_backends()


def _randn(*shape):
    return torch.randn(*shape, dtype=torch.float64, generator=_GENERATOR)


_GENERATOR = torch.Generator().manual_seed(0)

# name: (query shape, key shape, value shape, keyword arguments)
ATTENTION_CASES = {
    "2-D": ((5, 4), (6, 4), (6, 3), {}),
    "2-D with a mask": ((5, 4), (6, 4), (6, 3), {"attn_mask": "float"}),
    "query batch 2, key and value batch 1": ((2, 3, 5, 4), (1, 3, 6, 4), (1, 3, 6, 3), {}),
    "query batch 1, key and value batch 2": ((1, 3, 5, 4), (2, 3, 6, 4), (2, 3, 6, 3), {}),
    "key of rank 3, query of rank 4": ((2, 1, 5, 4), (1, 6, 4), (1, 6, 3), {}),
    "one key head broadcast without enable_gqa": ((2, 4, 5, 4), (2, 1, 6, 4), (2, 1, 6, 3), {}),
    "one query head broadcast": ((2, 1, 5, 4), (2, 3, 6, 4), (2, 3, 6, 3), {}),
    "key 1 head, value 4 heads": ((1, 4, 5, 4), (1, 1, 6, 4), (1, 4, 6, 3), {"is_causal": True}),
    "gqa, key 2 heads, value 1": ((1, 4, 5, 4), (1, 2, 6, 4), (1, 1, 6, 3), {"enable_gqa": True}),
    "gqa, key 2 heads, value 3": ((1, 6, 5, 4), (1, 2, 6, 4), (1, 3, 6, 3), {"enable_gqa": True}),
    "rank 5 with broadcast": ((2, 1, 2, 5, 4), (1, 3, 2, 6, 4), (2, 3, 2, 6, 3), {"attn_mask": "bool"}),
    "zero heads": ((1, 0, 5, 4), (1, 0, 6, 4), (1, 0, 6, 3), {}),
    "dropout_p 1": ((1, 2, 5, 4), (1, 2, 6, 4), (1, 2, 6, 3), {"dropout_p": 1.0}),
    "dropout_p True": ((1, 2, 5, 4), (1, 2, 6, 4), (1, 2, 6, 3), {"dropout_p": True}),
    "dropout_p False": ((1, 2, 5, 4), (1, 2, 6, 4), (1, 2, 6, 3), {"dropout_p": False}),
    "dropout_p a 0-d tensor": ((1, 2, 5, 4), (1, 2, 6, 4), (1, 2, 6, 3), {"dropout_p": torch.tensor(0.0)}),
    "scale a numpy float32": ((1, 2, 5, 4), (1, 2, 6, 4), (1, 2, 6, 3), {"scale": np.float32(0.5)}),
    "scale a 0-d tensor": ((1, 2, 5, 4), (1, 2, 6, 4), (1, 2, 6, 3), {"scale": torch.tensor(0.25)}),
}


def _attention_inputs(case):
    q_shape, k_shape, v_shape, kwargs = ATTENTION_CASES[case]
    q, k, v = (_randn(*s).requires_grad_() for s in (q_shape, k_shape, v_shape))
    kwargs = dict(kwargs)
    if kwargs.get("attn_mask") == "float":
        kwargs["attn_mask"] = _randn(q_shape[-2], k_shape[-2])
    elif kwargs.get("attn_mask") == "bool":
        kwargs["attn_mask"] = torch.rand(q_shape[-2], k_shape[-2], generator=_GENERATOR) > 0.3
    return q, k, v, kwargs


def _results_and_gradients(fn, q, k, v, kwargs):
    out = fn(q, k, v, **kwargs)
    if out.numel() == 0:
        return [out]
    grad_out = torch.ones_like(out)
    return [out, *torch.autograd.grad(out, (q, k, v), grad_out, allow_unused=True, materialize_grads=True)]


def _torch_math(q, k, v, **kwargs):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention_serves_what_torch_accepts(backend, case):
    q, k, v, kwargs = _attention_inputs(case)
    expected = _results_and_gradients(_torch_math, q, k, v, kwargs)
    try:
        ours = _results_and_gradients(
            lambda *a, **kw: attnkernels.scaled_dot_product_attention(*a, backend=backend, **kw), q, k, v, kwargs)
    except RuntimeError as error:
        if "cannot serve these inputs" in str(error):
            pytest.skip(str(error))
        raise
    for mine, theirs in zip(ours, expected, strict=True):
        assert mine.shape == theirs.shape
        torch.testing.assert_close(mine, theirs, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention_under_the_patch_does_not_fall_back(case):
    q, k, v, kwargs = _attention_inputs(case)
    expected = _torch_math(q, k, v, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback warns
        with attnkernels.patched():
            ours = F.scaled_dot_product_attention(q, k, v, **kwargs)
    torch.testing.assert_close(ours, expected, atol=1e-10, rtol=1e-10)


# ----------------------------------------------------------------------------- torch.func

_X = _randn(2, 3, 5, 6)
_GRID = torch.rand(2, 4, 3, 2, dtype=torch.float64, generator=_GENERATOR) * 2.2 - 1.1
_THETA = torch.eye(2, 3, dtype=torch.float64).expand(2, 2, 3) + 0.1 * _randn(2, 2, 3)
_Q = _randn(2, 2, 5, 4)

# name: (ours, torch's, the argument differentiated)
FUNCTIONS = {
    "grid_sample": (lambda x: attnkernels.grid_sample(x, _GRID, align_corners=False),
                    lambda x: F.grid_sample(x, _GRID, align_corners=False), _X),
    "grid_sample to the grid": (lambda g: attnkernels.grid_sample(_X, g, padding_mode="border", align_corners=True),
                                lambda g: F.grid_sample(_X, g, padding_mode="border", align_corners=True), _GRID),
    "affine_grid": (lambda t: attnkernels.affine_grid(t, (2, 3, 4, 5), align_corners=False),
                    lambda t: F.affine_grid(t, (2, 3, 4, 5), align_corners=False), _THETA),
    "affine_grid_sample": (
        lambda t: attnkernels.affine_grid_sample(_X, t, align_corners=False),
        lambda t: F.grid_sample(_X, F.affine_grid(t, _X.shape, align_corners=False), align_corners=False), _THETA),
    "scaled_dot_product_attention": (lambda q: attnkernels.scaled_dot_product_attention(q, q, q, is_causal=True),
                                     lambda q: _torch_math(q, q, q, is_causal=True), _Q),
    "attention_with_lse": (lambda q: attnkernels.attention_with_lse(q, q, q)[1],
                           lambda q: torch.logsumexp(q @ q.transpose(-1, -2) / 2, -1), _Q),
}


# torch 2.11's functorch fails inside autograd.graph ("Expected a proper Tensor but got None") when the
# reference sampler is differentiated to its coordinates; torch 2.14 computes them. Seen in CI's torch
# 2.11 stage; the cause inside torch is not established.
_TORCH_2_11 = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2]) < (2, 12)
_FUNCTORCH_GAP = pytest.mark.xfail(_TORCH_2_11, reason="torch 2.11 functorch: sampler gradient to the coordinates",
                                   strict=True)


@pytest.mark.parametrize("name", [pytest.param(name, marks=_FUNCTORCH_GAP) if name in (
    "grid_sample to the grid", "affine_grid_sample") else name for name in FUNCTIONS])
def test_torch_func_grad_and_jacrev(name):
    ours, theirs, argument = FUNCTIONS[name]
    torch.testing.assert_close(torch.func.grad(lambda a: ours(a).square().sum())(argument),
                               torch.func.grad(lambda a: theirs(a).square().sum())(argument))
    torch.testing.assert_close(torch.func.jacrev(ours)(argument), torch.func.jacrev(theirs)(argument))
