"""Attention written from the math in plain PyTorch: the oracle for the attention kernels.

It builds the full L x S score matrix (memory O(L·S)), so it is for testing
and small inputs. It never calls ``torch.nn.functional.scaled_dot_product_attention``.
The caller (``attnkernels.attention``) validates the arguments.
"""

from __future__ import annotations

import math

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64, float32 for every other floating dtype (fp32 accumulation of fp16/bf16)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_scale(head_dim: int) -> float:
    """1 / sqrt(E), torch's default; 1 for an empty head dim (the scores are all 0 then anyway)."""
    return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0


def attention_with_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
                       scale: float | None = None, enable_gqa: bool = False, *,
                       dropout_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(query keyᵀ · scale + mask) value and the log-sum-exp of each row of the scores.

    query: (..., Hq, L, E); key: (..., Hkv, S, E); value: (..., Hkv, S, Ev); Hkv divides Hq
    attn_mask: bool (True attends) or float (added to the scores), broadcast to (..., Hq, L, S)
    dropout_mask: bool, broadcast to (..., Hq, L, S), True where a weight is kept; drawn from
        torch's generator when None and dropout_p > 0
    returns: out (..., Hq, L, Ev) in query's dtype; lse (..., Hq, L) in float32 (float64 for
        float64 inputs), -inf for a row that attends to nothing (whose output is 0)
    """
    acc = accumulation_dtype(query.dtype)
    if scale is None:
        scale = default_scale(query.shape[-1])
    q, k, v = query.to(acc), key.to(acc), value.to(acc)
    q_heads, kv_heads = q.shape[-3], k.shape[-3]
    if q_heads != kv_heads:  # GQA: query head h reads kv head h // (Hq / Hkv)
        k = k.repeat_interleave(q_heads // kv_heads, dim=-3)
        v = v.repeat_interleave(q_heads // kv_heads, dim=-3)
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    L, S = scores.shape[-2], scores.shape[-1]
    # Masks are added, as torch adds them: a NaN score behind a mask stays NaN (NaN - inf), as in torch.
    if is_causal:  # top-left: query i sees keys j <= i
        hidden = torch.ones(L, S, dtype=torch.bool, device=q.device).triu(1)
        scores = scores + torch.where(hidden, -math.inf, 0.0)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores + torch.where(attn_mask, 0.0, -math.inf)
        else:
            scores = scores + attn_mask.to(acc)
    # Shift by the row maximum for stability; the shift cancels, so it carries no gradient.
    # A row whose every score is -inf gets shift 0, probabilities 0 and lse -inf.
    row_max = scores.detach().amax(dim=-1, keepdim=True) if S > 0 else scores.new_zeros((*scores.shape[:-1], 1))
    shift = torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max)
    weights = torch.exp(scores - shift)
    total = weights.sum(dim=-1, keepdim=True)
    # log and division only of positive totals: a fully masked row must not send NaN gradients back;
    # a NaN total (a NaN score) is not a masked row and gives NaN, as torch does
    attended = (total > 0) | total.isnan()
    safe_total = torch.where(attended, total, torch.ones_like(total))
    probs = weights / safe_total
    lse = torch.where(attended, shift + torch.log(safe_total), -math.inf).squeeze(-1)
    if dropout_p > 0:
        if dropout_mask is None:
            dropout_mask = torch.rand(probs.shape, device=probs.device) >= dropout_p
        probs = probs * dropout_mask.to(acc) / (1.0 - dropout_p)
    out = torch.matmul(probs, v)
    return out.to(query.dtype), lse


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False, *,
                                 dropout_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The output of ``attention_with_lse``: (..., Hq, L, Ev)."""
    return attention_with_lse(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                              dropout_mask=dropout_mask)[0]


def merge_attention(outs, lses) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attention over disjoint sets of keys into attention over their union.

    outs: sequence of (..., L, Ev); lses: sequence of (..., L), the log-sum-exp of each part
    returns: out (..., L, Ev) in the dtype of outs[0]; lse (..., L) in the dtype of lses[0]

    The union's lse is logsumexp over the parts; each part's output is weighted by
    exp(lse_part - lse_union). Parts with lse -inf (no key attended) get weight 0.
    """
    acc = accumulation_dtype(outs[0].dtype)
    lse_all = torch.stack([lse.to(acc) for lse in lses])
    top = lse_all.detach().amax(dim=0)
    shift = torch.where(torch.isneginf(top), torch.zeros_like(top), top)
    weights = torch.exp(lse_all - shift)
    total = weights.sum(dim=0)
    attended = (total > 0) | total.isnan()  # a NaN part makes the union NaN, not empty
    safe_total = torch.where(attended, total, torch.ones_like(total))
    lse = torch.where(attended, shift + torch.log(safe_total), -math.inf)
    weights = weights / safe_total
    out = sum(w.unsqueeze(-1) * o.to(acc) for w, o in zip(weights.unbind(0), outs, strict=True))
    return out.to(outs[0].dtype), lse.to(lses[0].dtype)


# The CPU kernel's dropout generator (csrc/cpu/attention_math.h, DropoutMask), in
# 64-bit integer tensor arithmetic: the kernel's mask, rebuilt for tests and for
# the double backward of the kernel. int64 products wrap modulo 2^64 like uint64.
_GOLDEN = 0x9E3779B97F4A7C15
_MIX_1 = 0xBF58476D1CE4E5B9
_MIX_2 = 0x94D049BB133111EB
_SEED_SALT = 0x6A09E667F3BCC909
_U64 = (1 << 64) - 1


def _signed(value: int) -> int:
    value &= _U64
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical (unsigned) right shift of int64 holding uint64 bits."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    z = (z ^ _shift_right(z, 30)) * _signed(_MIX_1)
    z = (z ^ _shift_right(z, 27)) * _signed(_MIX_2)
    return z ^ _shift_right(z, 31)


def _mix_int(z: int) -> int:
    z &= _U64
    z = ((z ^ (z >> 30)) * _MIX_1) & _U64
    z = ((z ^ (z >> 27)) * _MIX_2) & _U64
    return z ^ (z >> 31)


def kernel_dropout_mask(seed: int, shape: tuple[int, int, int, int], dropout_p: float,
                        device: torch.device | str = "cpu") -> torch.Tensor:
    """The keep mask (True keeps) that the cpu kernel draws from ``seed`` for a
    (batch, query heads, L, S) attention matrix."""
    key = _mix_int((seed & _U64) ^ _SEED_SALT)
    threshold = math.floor(dropout_p * 16777216.0 + 0.5)
    element = torch.arange(math.prod(shape), dtype=torch.int64, device=device)
    z = element * _signed(_GOLDEN) + _signed(key)
    return (_shift_right(_mix(z), 40) >= threshold).reshape(shape)
