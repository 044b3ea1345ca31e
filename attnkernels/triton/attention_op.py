"""Fused attention on Triton: the ops ``attnkernels::triton_attention`` and its backward, which launch
the kernels of ``attention``, and the function the public API calls.

Fake kernels and autograd are attention's shared ones (``attnkernels/_library/attention.py``). The
double backward with dropout needs the kernels' mask: they draw it from Triton's Philox stream, so
``dropout_mask`` rebuilds it with the same ``_keep`` in a small kernel of its own.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .._checks import broadcast_shapes
from .._library.attention import register_attention
from ._sampler import INTERPRETER
from .attention import _backward_kv_kernel, _backward_q_kernel, _dropout_keep_kernel, _forward_kernel


def _buckets(L: int, S: int) -> tuple[int, int]:
    """The autotuning key's lengths: the next powers of two."""
    return triton.next_power_of_2(L), triton.next_power_of_2(S)


def _padded(dim: int) -> int:
    """Head dims are padded to a power of two, at least 16 (tl.dot's smallest tile)."""
    return max(16, triton.next_power_of_2(max(dim, 1)))


def _dot_in_float32(dtype: torch.dtype) -> bool:
    """Under the interpreter bfloat16 tiles go through tl.dot as float32 (see ``_operand``)."""
    return INTERPRETER and dtype == torch.bfloat16


def _accumulation(dtype: torch.dtype) -> tuple[torch.dtype, object, str]:
    """(accumulation dtype, its Triton dtype, tl.dot input precision): float32 inputs use IEEE
    float32 products, not TF32, as torch does by default."""
    if dtype == torch.float64:
        return torch.float64, tl.float64, "ieee"
    return torch.float32, tl.float32, "ieee" if dtype == torch.float32 else "tf32"


def _params(scale: float, dropout_p: float, attn_mask: torch.Tensor | None, acc: torch.dtype,
            device: torch.device) -> torch.Tensor:
    """Per-call constants in the accumulation dtype (a Python float reaches a kernel as float32), in
    the order of the kernels' _SCORE_SCALE ... _PER_NATURAL: scores in base 2, natural with a float
    mask."""
    keep_scale = 0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p)
    log2e = 1.0 / math.log(2.0)
    per_natural = 1.0 if attn_mask is not None and attn_mask.dtype != torch.bool else log2e
    return torch.tensor([scale * per_natural, scale, keep_scale, log2e / per_natural, 1.0 / per_natural, per_natural],
                        dtype=acc, device=device)


def _mask_strides(attn_mask: torch.Tensor | None) -> tuple[int, int, int, int]:
    return tuple(attn_mask.stride()) if attn_mask is not None else (0, 0, 0, 0)


@triton_op("attnkernels::triton_attention", mutates_args={})
def _attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None,
                  dropout_p: float, is_causal: bool, scale: float,
                  seed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """query: (B, Hq, L, E); key: (B, Hkv, S, E); value: (B, Hkv, S, EV); attn_mask: None or (B, Hq, L, S)
    (any strides, bool or float); seed: int64 (1,) when dropout_p > 0.
    Returns out (B, Hq, L, EV) and the log-sum-exp (B, Hq, L) in the accumulation dtype."""
    B, Hq, L, E = query.shape
    Hkv, S, EV = key.shape[1], key.shape[2], value.shape[3]
    acc, tl_acc, precision = _accumulation(query.dtype)
    out = torch.empty((B, Hq, L, EV), dtype=query.dtype, device=query.device)
    lse = torch.empty((B, Hq, L), dtype=acc, device=query.device)
    if B * Hq * L == 0:
        return out, lse
    if S == 0:  # nothing to attend to: every row is fully masked
        return out.zero_(), lse.fill_(float("-inf"))
    has_dropout = dropout_p > 0
    params = _params(scale, dropout_p, attn_mask, acc, query.device)

    def grid(meta):
        return (triton.cdiv(L, meta["BLOCK_M"]) * B * Hq,)

    wrap_triton(_forward_kernel)[grid](
        query, key, value, attn_mask if attn_mask is not None else query, seed if has_dropout else params,
        params, out, lse,
        *query.stride(), *key.stride(), *value.stride(), *_mask_strides(attn_mask),
        Hq, L, S, E, EV, Hq // Hkv, float(dropout_p), *_buckets(L, S),
        HAS_MASK=attn_mask is not None, MASK_BOOL=attn_mask is not None and attn_mask.dtype == torch.bool,
        IS_CAUSAL=is_causal, HAS_DROPOUT=has_dropout, PRECISION=precision, DOT_FP32=_dot_in_float32(query.dtype),
        ACC=tl_acc, BLOCK_E=_padded(E), BLOCK_EV=_padded(EV))
    return out, lse


@triton_op("attnkernels::triton_attention_backward", mutates_args={})
def _attention_backward_op(grad_out: torch.Tensor, grad_lse: torch.Tensor | None, query: torch.Tensor,
                           key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None,
                           out: torch.Tensor, lse: torch.Tensor, dropout_p: float, is_causal: bool, scale: float,
                           seed: torch.Tensor | None, output_mask: list[bool]
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients to query, key, value and (output_mask[3]) the float mask, as the (B, Hq, L, S) scores
    gradient in the accumulation dtype (the caller's broadcasting of the mask reduces it); empty
    where output_mask does not ask for them."""
    mask_grad = bool(output_mask[3]) and attn_mask is not None
    B, Hq, L, E = query.shape
    Hkv, S, EV = key.shape[1], key.shape[2], value.shape[3]
    acc, tl_acc, precision = _accumulation(query.dtype)
    grad_q = torch.zeros((B, Hq, L, E), dtype=acc, device=query.device)
    grad_k = torch.zeros((B, Hkv, S, E), dtype=acc, device=query.device)
    grad_v = torch.zeros((B, Hkv, S, EV), dtype=acc, device=query.device)
    grad_mask = torch.zeros((B, Hq, L, S) if mask_grad else (0,), dtype=acc, device=query.device)
    if B * Hq * L * S > 0:
        # delta = rowsum(dO * O) (dropout included); a log-sum-exp gradient enters the same place.
        delta = (grad_out.to(acc) * out.to(acc)).sum(-1)
        if grad_lse is not None:
            delta = delta - grad_lse.to(acc)
        delta = delta.contiguous()
        lse = lse.contiguous()
        has_dropout = dropout_p > 0
        params = _params(scale, dropout_p, attn_mask, acc, query.device)
        mask_arg = attn_mask if attn_mask is not None else query
        seed_arg = seed if has_dropout else params
        common = dict(HAS_MASK=attn_mask is not None,
                      MASK_BOOL=attn_mask is not None and attn_mask.dtype == torch.bool,
                      IS_CAUSAL=is_causal, HAS_DROPOUT=has_dropout, PRECISION=precision,
                      DOT_FP32=_dot_in_float32(query.dtype), ACC=tl_acc,
                      BLOCK_E=_padded(E), BLOCK_EV=_padded(EV))
        strides = (*query.stride(), *key.stride(), *value.stride(), *_mask_strides(attn_mask), *grad_out.stride())

        def kv_grid(meta):
            return (triton.cdiv(S, meta["BLOCK_N"]) * B * Hkv,)

        def q_grid(meta):
            return (triton.cdiv(L, meta["BLOCK_M"]) * B * Hq,)

        wrap_triton(_backward_kv_kernel)[kv_grid](
            query, key, value, mask_arg, seed_arg, params, grad_out, lse, delta, grad_k, grad_v, *strides,
            Hq, Hkv, L, S, E, EV, Hq // Hkv, float(dropout_p), *_buckets(L, S), **common)
        wrap_triton(_backward_q_kernel)[q_grid](
            query, key, value, mask_arg, seed_arg, params, grad_out, lse, delta, grad_q, grad_mask, *strides,
            Hq, L, S, E, EV, Hq // Hkv, float(dropout_p), *_buckets(L, S), MASK_GRAD=mask_grad, **common)
    grads = (grad_q.to(query.dtype), grad_k.to(key.dtype), grad_v.to(value.dtype))
    return (*(g if wanted else g.new_empty((0,)) for g, wanted in zip(grads, output_mask[:3], strict=True)), grad_mask)


def dropout_mask(seed: int, shape: tuple[int, int, int, int], dropout_p: float,
                 device: torch.device) -> torch.Tensor:
    """The kernels' dropout mask for ``seed``: (B, Hq, L, S) bool, True where a weight is kept."""
    batch, heads, L, S = shape
    keep = torch.empty((batch * heads, L, S), dtype=torch.uint8, device=device)
    if keep.numel() > 0:
        block = 32
        _dropout_keep_kernel[(batch * heads, triton.cdiv(L, block), triton.cdiv(S, block))](
            torch.tensor([seed], dtype=torch.int64, device=device), keep, L, S, float(dropout_p),
            BLOCK_M=block, BLOCK_N=block)
    return keep.view(shape).bool()


register_attention(_attention_op, _attention_backward_op, dropout_mask=dropout_mask)


def _flatten_batch(t: torch.Tensor, batch: tuple[int, ...], tail: tuple[int, ...]) -> torch.Tensor:
    """Broadcast ``t`` to (*batch, *tail) and merge the batch dims, as a view when the strides
    allow (a broadcast mask stays stride 0), otherwise as a copy."""
    t = t.expand(*batch, *tail)
    flat = (math.prod(batch), *tail)
    try:
        return t.view(flat)
    except RuntimeError:
        return t.reshape(flat)


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
              dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
              enable_gqa: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(query keyᵀ · scale + mask) value, and the log-sum-exp of each row.

    query: (..., Hq, L, E); key: (..., Hkv, S, E); value: (..., Hkv, S, Ev), Hkv dividing Hq
    (Hkv < Hq only with enable_gqa); attn_mask: bool (True attends) or float (added), broadcastable
    to (..., Hq, L, S); scale: None for 1 / sqrt(E).
    Returns out (..., Hq, L, Ev) and lse (..., Hq, L), float32 (float64 for float64 inputs); a
    fully masked row gives 0 and lse -inf. Differentiable to query, key, value and a float mask.
    The caller validates the arguments.
    """
    del enable_gqa  # the head counts say it all: query head h reads KV head h // (Hq // Hkv)
    batch = broadcast_shapes(query.shape[:-3], key.shape[:-3], value.shape[:-3])
    Hq, L, E = query.shape[-3:]
    Hkv, S = key.shape[-3], key.shape[-2]
    q = _flatten_batch(query, batch, (Hq, L, E))
    k = _flatten_batch(key, batch, (Hkv, S, E))
    v = _flatten_batch(value, batch, (Hkv, S, value.shape[-1]))
    mask = None if attn_mask is None else _flatten_batch(attn_mask, batch, (Hq, L, S))
    if scale is None:
        scale = 1.0 / math.sqrt(E) if E > 0 else 1.0
    seed = None
    if dropout_p > 0:
        seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=query.device)
    out, lse = _attention_op(q, k, v, mask, float(dropout_p), bool(is_causal), float(scale), seed)
    return out.view(*batch, Hq, L, out.shape[-1]), lse.view(*batch, Hq, L)
