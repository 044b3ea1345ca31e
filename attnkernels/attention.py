"""Fused attention: softmax(Q Kᵀ · scale + mask) V without building the score matrix.

``scaled_dot_product_attention`` is a drop-in replacement for torch's (same
arguments, shapes, dtypes and errors); ``attention_with_lse`` also returns the
log-sum-exp of every row, and ``merge_attention`` combines attention computed
over disjoint sets of keys (split-KV decoding, ring attention). Arguments are validated once
here; the backend is selected from attention's table (the cuda and cpu entries here, triton's in
``attnkernels.triton``, the reference's in ``attnkernels.reference.backends``) and run.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from . import reference
from ._checks import broadcast_shapes, check_like, check_tensor
from ._dispatch import (
    Backend,
    Request,
    backend_table,
    call_op,
    not_supported_reasons,
    select,
    triton_module,
    unavailable,
)
from .reference.attention import accumulation_dtype, default_scale
from .reference.backends import BACKENDS as REFERENCE_BACKENDS

_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# The compiled kernels' operator; its presence per device decides the cuda and cpu backends.
_OP = "attention"
_FEATURES = frozenset({"mask", "dropout", "causal", "gqa"})


def _tensors_for_kernels(query, key, value, attn_mask):
    """(query, key, value, mask) as the kernels take them: (B, H, L, E) with the batch dimensions
    merged, a float mask in the accumulation dtype (the kernels add masks in it) and broadcast to
    (B, Hq, L, S) as a view where the strides allow (the kernels read it through its strides)."""
    if attn_mask is None and query.dim() == 4 and key.dim() == 4 and value.dim() == 4:
        return query, key, value, None
    batch = math.prod(query.shape[:-3])
    q_heads, L, E = query.shape[-3:]
    kv_heads, S = key.shape[-3], key.shape[-2]
    # 4-D inputs are already in the kernels' form (a reshape to the same shape costs a view)
    q = query if query.dim() == 4 else query.reshape(batch, q_heads, L, E)
    k = key if key.dim() == 4 else key.reshape(batch, kv_heads, S, E)
    v = value if value.dim() == 4 else value.reshape(batch, kv_heads, S, value.shape[-1])
    mask = attn_mask
    if mask is not None:
        if mask.is_floating_point() and mask.dtype != accumulation_dtype(query.dtype):
            mask = mask.to(accumulation_dtype(query.dtype))
        full = (*query.shape[:-1], S)
        if mask.shape != full:
            mask = mask.expand(full)
        if mask.dim() != 4:
            mask = mask.reshape(batch, q_heads, L, S)
    return q, k, v, mask


def _compiled(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """Runs attnkernels::attention (the C++ and CUDA kernels) on inputs of any batch rank."""
    q, k, v, mask = _tensors_for_kernels(query, key, value, attn_mask)
    seed = None
    if dropout_p > 0:  # drawn from torch's generator, so torch.manual_seed reproduces the mask
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64)
    # The op's one overload, named: calling the overload packet resolves the overload on every call.
    args = (q, k, v, mask, float(dropout_p), bool(is_causal), float(scale), seed)
    out, lse = call_op(torch.ops.attnkernels.attention.default, args, (q, k, v, mask))
    if query.dim() == 4:
        return out, lse
    return out.reshape(*query.shape[:-1], value.shape[-1]), lse.reshape(query.shape[:-1])


def _compiled_gradient(*args):
    return torch.ops.attnkernels.attention_backward.default(*args)


# What the hand-written CUDA kernels (csrc/cuda/attention_*.cu) serve; the launch limits restate
# csrc/cuda/attention_launch.h.
_CUDA_MAX_SEQUENCE = 2**31 - 1 - 256
_CUDA_MAX_GRID_YZ = 65535


def _cuda_launch_limits(request: Request) -> str | None:
    query, key = request.tensors["query"], request.tensors["key"]
    if max(query.shape[-2], key.shape[-2]) > _CUDA_MAX_SEQUENCE:
        return f"the CUDA attention kernel takes sequences of at most {_CUDA_MAX_SEQUENCE} positions"
    batch = math.prod(query.shape[:-3])
    if batch > _CUDA_MAX_GRID_YZ or query.shape[-3] > _CUDA_MAX_GRID_YZ:
        return f"the CUDA attention kernel takes at most {_CUDA_MAX_GRID_YZ} batch entries and query heads"
    return None


_CUDA = Backend("cuda", run=_compiled, label="the CUDA attention kernel", dtypes=(torch.float16, torch.bfloat16),
                max_head_dim=256, features=_FEATURES, extra_reasons=_cuda_launch_limits, gradient=_compiled_gradient)
_CPU = Backend("cpu", run=_compiled, label="the CPU attention kernel", features=_FEATURES,
               gradient=_compiled_gradient)


def _backends() -> tuple[Backend, ...]:
    """Attention's table, in the order tried on CUDA tensors: Triton before the hand-written CUDA
    kernels, then cpu and reference. On an H200 (bench/RESULTS-gpu.md) the Triton kernels ran bf16
    attention 1.5-2.9x faster than the CUDA ones (mma.sync, no Hopper wgmma) at 4k and 16k tokens,
    forward and backward; the CUDA kernels serve where Triton is missing or declines."""
    return backend_table(_OP, _build_backends)


def _build_backends() -> tuple[Backend, ...]:
    module = triton_module()
    triton = (module.BACKENDS[_OP] if module is not None and hasattr(module, "BACKENDS")
              else unavailable("triton", "the attnkernels.triton module has no attention kernel"))
    return triton, _CUDA, _CPU, REFERENCE_BACKENDS[_OP]


_NO_FEATURES: frozenset[str] = frozenset()


def _request(query, key, value, attn_mask, dropout_p: float, is_causal: bool = False) -> Request:
    gqa = key.shape[-3] != query.shape[-3]
    features = _NO_FEATURES
    if attn_mask is not None or dropout_p > 0 or is_causal or gqa:
        features = frozenset(name for name, used in (("mask", attn_mask is not None), ("dropout", dropout_p > 0),
                                                     ("causal", is_causal), ("gqa", gqa)) if used)
    return Request(_OP, query, head_dims=(query.shape[-1], value.shape[-1]), features=features,
                   tensors={"query": query, "key": key, "value": value, "attn_mask": attn_mask})


def _cuda_why_not(query, key, value, attn_mask) -> str | None:
    """Why the cuda entry cannot serve these inputs, or None."""
    return not_supported_reasons(_CUDA, _request(query, key, value, attn_mask, 0.0))


def check_mask_kind(op: str, attn_mask, query: torch.Tensor, is_causal: bool) -> None:
    """attn_mask is a tensor of an accepted dtype on query's device, and not given with is_causal."""
    check_tensor(op, "attn_mask", attn_mask)
    if is_causal:
        raise RuntimeError(f"attnkernels.{op}: `attn_mask` and `is_causal=True` cannot be used together "
                           "(fold the causal mask into attn_mask)")
    if attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
        raise RuntimeError(f"attnkernels.{op}: expected `attn_mask` to be bool, float32 or of the dtype of "
                           f"`query` ({query.dtype}), got {attn_mask.dtype}")
    if attn_mask.device != query.device:
        raise RuntimeError(f"attnkernels.{op}: expected `attn_mask` on the device of `query` ({query.device}), "
                           f"got {attn_mask.device}")


def broadcasts_to(attn_mask: torch.Tensor, target: tuple[int, ...]) -> bool:
    """Whether the mask broadcasts to exactly ``target`` (no dimension of its own is larger or extra)."""
    try:
        return attn_mask.dim() <= len(target) and broadcast_shapes(attn_mask.shape, target) == tuple(target)
    except RuntimeError:
        return False


def _as_number(op: str, name: str, value) -> float:
    """A Python float from a number as torch's argument parser takes it (bool, numpy scalar, 0-d tensor)."""
    if type(value) is float:  # the common case, first: this runs on every call
        return value
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.is_complex():
            raise TypeError(f"attnkernels.{op}: expected `{name}` to be a number or a 0-d real tensor, "
                            f"got a tensor of sizes {list(value.shape)}")
        return float(value.item())
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(f"attnkernels.{op}: expected `{name}` to be a number, got {type(value).__name__}")


def _heads_for_gqa(op: str, query, key, value):
    """key and value with one head count dividing the query's, as torch's enable_gqa reads them:
    query head h uses key head h // (Hq / Hk) and value head h // (Hq / Hv)."""
    q_heads, k_heads, v_heads = query.shape[-3], key.shape[-3], value.shape[-3]
    for name, heads in (("key", k_heads), ("value", v_heads)):
        if heads == 0 or q_heads % heads != 0:
            raise RuntimeError(f"attnkernels.{op}: with enable_gqa=True the number of `{name}` heads ({heads}) "
                               f"must divide the number of `query` heads ({q_heads})")
    if k_heads == v_heads:
        return key, value
    # Unequal key and value head counts: repeat the fewer to the other's count if it divides it
    # (head j of the repeated tensor is head j // ratio), else both to the query's.
    if k_heads % v_heads == 0:
        return key, value.repeat_interleave(k_heads // v_heads, dim=-3)
    if v_heads % k_heads == 0:
        return key.repeat_interleave(v_heads // k_heads, dim=-3), value
    return (key.repeat_interleave(q_heads // k_heads, dim=-3), value.repeat_interleave(q_heads // v_heads, dim=-3))


def _expand(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``t.expand(shape)``, or ``t`` itself when it has that shape already (expand costs a view)."""
    return t if t.shape == shape else t.expand(shape)


def _prepared_plain_call(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """``_prepare``'s result for the common call it would return unchanged, else None: plain tensors of
    shape (B, H, L, E) with the same batch and heads, no mask, no enable_gqa, float dropout_p and
    scale. Every check of ``_prepare`` that such a call could fail is made here; it saves ~3 us of a
    short call (a decoding step, a 128-token image window)."""
    if not (type(query) is torch.Tensor and type(key) is torch.Tensor and type(value) is torch.Tensor
            and attn_mask is None and enable_gqa is False and type(is_causal) is bool
            and type(dropout_p) is float and 0.0 <= dropout_p <= 1.0 and (scale is None or type(scale) is float)):
        return None
    q_shape, k_shape, v_shape = query.shape, key.shape, value.shape
    if not (len(q_shape) == len(k_shape) == len(v_shape) == 4 and q_shape[0] == k_shape[0] == v_shape[0]
            and q_shape[1] == k_shape[1] == v_shape[1] and k_shape[3] == q_shape[3] and v_shape[2] == k_shape[2]):
        return None
    dtype = query.dtype
    if dtype not in _FLOATING or key.dtype != dtype or value.dtype != dtype:
        return None
    # One device, asked without building device objects (~0.3 us each): all on the CPU, or all on one GPU.
    if not ((query.is_cpu and key.is_cpu and value.is_cpu) or (
            query.is_cuda and key.is_cuda and value.is_cuda
            and query.get_device() == key.get_device() == value.get_device())):
        return None
    return query, key, value, None, dropout_p, scale, 0


def _prepare(op: str, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """Checks the arguments and brings them to the form every backend takes, with torch's semantics.

    torch treats every dimension before the last two as a batch dimension that broadcasts (after
    enable_gqa has repeated the key and value heads); the backends take (..., Hq, L, E) with key and
    value of the query's batch dimensions and one head count dividing Hq. Returns the prepared
    (query, key, value, attn_mask, dropout_p, scale) and the leading dimensions to drop from the
    results (those added to 2-D inputs).
    """
    fast = _prepared_plain_call(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if fast is not None:
        return fast
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_tensor(op, name, t)
    if query.dtype not in _FLOATING:
        raise RuntimeError(f"attnkernels.{op}: expected `query` to be float16, bfloat16, float32 or float64, "
                           f"got {query.dtype}")
    for name, t in (("key", key), ("value", value)):
        check_like(op, name, t, "query", query)
    for name, flag in (("is_causal", is_causal), ("enable_gqa", enable_gqa)):
        if not isinstance(flag, bool):  # "False" is truthy: refuse, as torch
            raise TypeError(f"attnkernels.{op}: expected `{name}` to be a bool, got {type(flag).__name__}")
    # Shapes read once: each .shape and .dim() is a call into torch, and this runs on every call.
    q_shape, k_shape, v_shape = query.shape, key.shape, value.shape
    for name, shape in (("query", q_shape), ("key", k_shape), ("value", v_shape)):
        if len(shape) < 2:
            raise RuntimeError(f"attnkernels.{op}: expected `{name}` of shape (..., L, E) with at least 2 "
                               f"dimensions, got sizes {list(shape)}")
    if enable_gqa and min(len(q_shape), len(k_shape), len(v_shape)) < 3:
        raise RuntimeError(f"attnkernels.{op}: enable_gqa=True needs `query`, `key` and `value` with a heads "
                           "dimension (..., heads, L, E)")
    if k_shape[-1] != q_shape[-1]:
        raise RuntimeError(f"attnkernels.{op}: expected `key` to have the head dim of `query` ({q_shape[-1]}), "
                           f"got sizes {list(k_shape)}")
    if v_shape[-2] != k_shape[-2]:
        raise RuntimeError(f"attnkernels.{op}: expected `value` to have the length of `key` ({k_shape[-2]}), "
                           f"got sizes {list(v_shape)}")
    dropout_p = _as_number(op, "dropout_p", dropout_p)
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"attnkernels.{op}: expected `dropout_p` to be a number in [0, 1], got {dropout_p!r}")
    if scale is not None:
        scale = _as_number(op, "scale", scale)

    dims = max(len(q_shape), len(k_shape), len(v_shape))
    rank = max(dims, 3)
    added = rank - dims  # leading dimensions the results drop
    if len(q_shape) != rank or len(k_shape) != rank or len(v_shape) != rank:
        query, key, value = (t if t.dim() == rank else t.reshape((1,) * (rank - t.dim()) + tuple(t.shape))
                             for t in (query, key, value))
        q_shape, k_shape, v_shape = query.shape, key.shape, value.shape
    if enable_gqa and (k_shape[-3] != q_shape[-3] or v_shape[-3] != q_shape[-3]):
        key, value = _heads_for_gqa(op, query, key, value)
        k_shape, v_shape = key.shape, value.shape
    # Every dimension before (L, E) broadcasts, heads included. Key and value heads that divide
    # the query's (grouped with enable_gqa, or one head broadcast) go to the kernels as they are.
    q_heads, k_heads, v_heads = q_shape[-3], k_shape[-3], v_shape[-3]
    grouped = k_heads == v_heads and (k_heads == q_heads or (
        k_heads > 0 and q_heads % k_heads == 0 and (enable_gqa or k_heads == 1)))
    if grouped:
        heads, kv_heads = q_heads, k_heads
    else:
        try:
            heads = kv_heads = broadcast_shapes((q_heads,), (k_heads,), (v_heads,))[0]
        except RuntimeError:
            raise RuntimeError(f"attnkernels.{op}: expected `query`, `key` and `value` to have the same number of "
                               f"heads or heads that broadcast, got {q_heads}, {k_heads} and {v_heads} "
                               "(pass enable_gqa=True for grouped query attention)") from None
    q_batch, k_batch, v_batch = q_shape[:-3], k_shape[:-3], v_shape[:-3]
    try:
        batch = q_batch if q_batch == k_batch == v_batch else broadcast_shapes(q_batch, k_batch, v_batch)
    except RuntimeError:
        raise RuntimeError(f"attnkernels.{op}: expected the batch dimensions of `key` {list(k_batch)} and "
                           f"`value` {list(v_batch)} to broadcast with those of `query` {list(q_batch)}") from None
    query = _expand(query, (*batch, heads, *q_shape[-2:]))
    key = _expand(key, (*batch, kv_heads, *k_shape[-2:]))
    value = _expand(value, (*batch, kv_heads, *v_shape[-2:]))

    if attn_mask is not None:
        check_mask_kind(op, attn_mask, query, is_causal)
        if attn_mask.dim() < 2:  # torch fails on these with an IndexError
            raise RuntimeError(f"attnkernels.{op}: expected `attn_mask` of shape (..., L, S) with at least 2 "
                               f"dimensions, got sizes {list(attn_mask.shape)}")
        target = (*query.shape[:-1], key.shape[-2])
        if not broadcasts_to(attn_mask, target):
            raise RuntimeError(f"attnkernels.{op}: expected `attn_mask` to broadcast to (..., heads, L, S) = "
                               f"{list(target[added:])}, got sizes {list(attn_mask.shape)}")
    return query, key, value, attn_mask, dropout_p, scale, added


def _select(op, query, key, value, attn_mask, dropout_p, backend, is_causal) -> Backend:
    return select(op, backend, _backends(), _request(query, key, value, attn_mask, dropout_p, is_causal))


def attention_backend(op: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attn_mask: torch.Tensor | None, dropout_p: float, backend: str | None) -> str:
    """The backend that computes attention for these (validated) inputs: ``backend`` if it can, else the best.

    Shared with ``attnkernels.distributed``, whose backward calls the chosen backend's ``attention_gradient``.
    """
    return _select(op, query, key, value, attn_mask, dropout_p, backend, False).name


def attention_gradient(backend: str):
    """The named backend's gradient kernel (the attention_backward op's signature), None for the reference."""
    for entry in _backends():
        if entry.name == backend:
            return entry.gradient
    raise ValueError(f"attnkernels: no attention backend named {backend!r}; expected one of "
                     f"{[entry.name for entry in _backends()]}")


def attention_with_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
                       scale: float | None = None, enable_gqa: bool = False, *,
                       backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention and the log-sum-exp of each row of the (scaled, masked) scores.

    query: (..., Hq, L, E); key: (..., Hkv, S, E); value: (..., Hkv, S, Ev)
    returns: out (..., Hq, L, Ev) in query's dtype; lse (..., Hq, L) in float32 (float64 for
        float64 inputs, so that merged float64 results stay exact); -inf for rows that attend to
        nothing, whose output is 0

    Arguments as ``scaled_dot_product_attention``. Differentiable to query, key, value,
    a float attn_mask and through lse.
    """
    op = "attention_with_lse"
    query, key, value, attn_mask, dropout_p, scale, added = _prepare(op, query, key, value, attn_mask, dropout_p,
                                                                     is_causal, scale, enable_gqa)
    scale = default_scale(query.shape[-1]) if scale is None else scale
    if dropout_p == 1.0:  # every weight dropped: zeros, as torch gives (the kernels take p < 1)
        out, lse = _dispatch(op, query, key, value, attn_mask, 0.0, is_causal, scale, enable_gqa, backend)
        out = out * 0
    else:
        out, lse = _dispatch(op, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend)
    if added:
        out, lse = out.reshape(out.shape[added:]), lse.reshape(lse.shape[added:])
    return out, lse


def _dispatch(op, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend):
    chosen = _select(op, query, key, value, attn_mask, dropout_p, backend, is_causal)
    return chosen.run(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False, *,
                                 backend: str | None = None) -> torch.Tensor:
    """softmax(query keyᵀ · scale + attn_mask) value, as ``torch.nn.functional.scaled_dot_product_attention``.

    query: (N, ..., Hq, L, E); key: (N, ..., Hkv, S, E); value: (N, ..., Hkv, S, Ev)
    returns: (N, ..., Hq, L, Ev)

    attn_mask: bool (True = attend) or float (added to the scores), broadcast to (..., Hq, L, S);
    is_causal: top-left causal mask (query i sees keys j <= i), not together with attn_mask;
    dropout_p: always applied when > 0, kept weights scaled by 1 / (1 - dropout_p);
    scale: default 1 / sqrt(E); enable_gqa: Hkv may divide Hq (query head h reads kv head
    h // (Hq / Hkv)). A row that attends to nothing gives 0. ``backend``: None for the best
    available, or one of ``available_backends()``.
    """
    return attention_with_lse(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                              backend=backend)[0]


def merge_attention(outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attention computed over disjoint sets of keys into attention over all of them.

    outs: sequence of (..., L, Ev), each from ``attention_with_lse`` over one set of keys
    lses: the matching sequence of (..., L)
    returns: (out (..., L, Ev), lse (..., L)), which can be merged again

    Exact (up to rounding) for attention without dropout: the union's lse is logsumexp of the
    parts', and each part's output is weighted by exp(lse_part - lse_union).
    """
    op = "merge_attention"
    if isinstance(outs, torch.Tensor) or isinstance(lses, torch.Tensor):
        raise TypeError(f"attnkernels.{op}: expected `outs` and `lses` to be sequences of tensors")
    outs, lses = list(outs), list(lses)
    if not outs or len(outs) != len(lses):
        raise ValueError(f"attnkernels.{op}: expected as many `lses` as `outs` (at least one), "
                         f"got {len(outs)} and {len(lses)}")
    for i, (out, lse) in enumerate(zip(outs, lses, strict=True)):
        check_tensor(op, f"outs[{i}]", out)
        check_tensor(op, f"lses[{i}]", lse)
        if not out.is_floating_point() or not lse.is_floating_point():
            raise RuntimeError(f"attnkernels.{op}: expected floating-point `outs[{i}]` and `lses[{i}]`")
        if out.dim() < 1 or out.shape != outs[0].shape or lse.shape != out.shape[:-1]:
            raise RuntimeError(f"attnkernels.{op}: expected every `outs[i]` of the shape of `outs[0]` "
                               f"{list(outs[0].shape)} and `lses[i]` of that shape without the last dimension, "
                               f"got {list(out.shape)} and {list(lse.shape)} at index {i}")
        if out.device != outs[0].device or lse.device != outs[0].device:
            raise RuntimeError(f"attnkernels.{op}: expected every tensor on {outs[0].device}, "
                               f"got {out.device} and {lse.device} at index {i}")
    return reference.merge_attention(outs, lses)


__all__ = ["attention_with_lse", "merge_attention", "scaled_dot_product_attention"]
