"""Sequence-parallel attention over torch.distributed: exact ring attention with a ring backward.

Each of the P ranks of a process group holds a shard of the sequence: its queries and its own
keys and values. The key/value blocks travel round the ring (rank r sends to r + 1 and receives
from r - 1) with ``torch.distributed.batch_isend_irecv``; while the next block is in flight, the
current one is attended to with ``attnkernels.attention_with_lse`` (any backend) and merged into
the running result through the log-sum-exp (``merge_attention``, in fp32, fp64 for fp64). After
P - 1 hops every query has seen every key, and no rank ever holds more than two blocks, so the
memory per rank is O((L/P) · E), never L × S.

The backward is a ring too: the blocks travel round again, each rank adds its queries' share of
the block's dK/dV to gradients that travel with the block, and one last hop hands them to the
block's owner. Each block's gradients come from the saved global output and log-sum-exp, which
makes them exact: the sum over blocks equals single-process attention's gradients.

Layouts (``load_balance``): with False, rank r holds the r-th of P contiguous chunks. With True,
the sequence is cut into 2P chunks and rank r holds chunks r and 2P - 1 - r (zig-zag), so under
a causal mask every rank does the same work. ``shard_sequence`` and ``unshard_sequence`` split a
full tensor and gather it back in either layout.

    import attnkernels.distributed as ring
    q, k, v = (ring.shard_sequence(t, dim=-2) for t in (q_full, k_full, v_full))
    out = ring.ring_attention(q, k, v, is_causal=True)          # this rank's rows of the output
    out_full = ring.unshard_sequence(out, dim=-2)
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from ._checks import check_tensor
from ._ring import DTYPES, RING_FIELDS, UNSHARD_FIELDS, agree, float_bits, group_of, listed_shape, owned_chunks
from ._ring import Ring as _Ring
from ._ring import Transfer as _Transfer  # noqa: F401  (the tests' stand-in ring subclasses it)
from .attention import (
    _prepare,
    _tensors_for_kernels,
    attention_backend,
    attention_gradient,
    attention_with_lse,
    broadcasts_to,
    check_mask_kind,
    merge_attention,
)
from .reference.attention import accumulation_dtype, default_scale

# ----------------------------------------------------------------------------- shard / unshard


def shard_sequence(x: torch.Tensor, dim: int, *, group=None, load_balance: bool = True) -> torch.Tensor:
    """This rank's shard of a full sequence tensor, in the layout ``ring_attention`` expects.

    x: the full tensor, the same on every rank, with the sequence along ``dim`` (e.g. -2 for
        (..., H, L, E), or for a (..., L, S) mask's rows)
    returns: (..., L/P, ...): with load_balance, chunks r and 2P - 1 - r of 2P, concatenated;
        otherwise the r-th of P contiguous chunks. Differentiable (a copy of the slices; in a group of
        one process, ``x`` itself).
    """
    check_tensor("shard_sequence", "x", x)
    group, rank, world = group_of("shard_sequence", group)
    dim = dim % x.dim() if x.dim() > 0 else dim
    if world == 1:
        return x
    count, mine = owned_chunks(rank, world, load_balance)
    length = x.shape[dim]
    if length % count:
        raise ValueError(f"attnkernels.shard_sequence: the length of `x` along dim {dim} ({length}) must be divisible "
                         f"by {count} ({'2 × ' if load_balance else ''}the group size {world}); pad the sequence")
    chunk = length // count
    return torch.cat([x.narrow(dim, i * chunk, chunk) for i in mine], dim)


def unshard_sequence(x: torch.Tensor, dim: int, *, group=None, load_balance: bool = True) -> torch.Tensor:
    """The full sequence tensor gathered from every rank's shard (the inverse of ``shard_sequence``).

    x: this rank's shard (..., L/P, ...) along ``dim``, the same shape and dtype on every rank
    returns: (..., L, ...) on every rank. Not differentiable (a plain all_gather).
    """
    op = "unshard_sequence"
    group, rank, world = group_of(op, group)
    error, values = None, None
    try:
        check_tensor(op, "x", x)
        if load_balance and world > 1 and x.shape[dim] % 2:
            raise ValueError(f"attnkernels.{op}: with load_balance=True a shard holds two equal chunks, so its "
                             f"length along dim {dim} must be even, got {x.shape[dim]}")
        dtype_code = DTYPES.index(x.dtype) if x.dtype in DTYPES else -1
        values = {"dtype": (dtype_code,), "shape": listed_shape(x.shape)}
    except (TypeError, ValueError, IndexError, RuntimeError) as e:
        error = e
    agree(op, group, rank, world, UNSHARD_FIELDS, values, error)
    if world == 1:
        return x
    pieces = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(world)]
    dist.all_gather(pieces, x.contiguous(), group=group)
    if not load_balance:
        return torch.cat(pieces, dim)
    halves = [piece.chunk(2, dim) for piece in pieces]
    # Rank r's halves are chunks r and 2P - 1 - r: the first halves in rank order, then the second ones reversed.
    return torch.cat([h[0] for h in halves] + [h[1] for h in reversed(halves)], dim)


def _rows(t: torch.Tensor, rows: slice) -> torch.Tensor:
    """The given rows of (..., L, E)."""
    return t[..., rows, :]


def _mask_block(attn_mask: torch.Tensor | None, rows: slice, columns: slice) -> torch.Tensor | None:
    if attn_mask is None:
        return None
    if attn_mask.dim() >= 2 and attn_mask.shape[-2] != 1:
        attn_mask = attn_mask[..., rows, :]
    if attn_mask.shape[-1] != 1:
        attn_mask = attn_mask[..., columns]
    return attn_mask


# ----------------------------------------------------------------------------- one block's gradients


def _kernel_block_gradients(gradient, grad_out, query, key, value, attn_mask, out, lse, is_causal, scale):
    """dQ, dK, dV of one block from a backend's ``gradient`` kernel, given the *global* out and lse.

    With the global lse the kernel's probabilities are the full softmax's entries for this block,
    and with the global out its row term rowsum(dO · O) is the full one, so the block's
    gradients are exactly its share of single-process attention's.
    """
    q, k, v, mask = _tensors_for_kernels(query, key, value, attn_mask)
    go, o = (t.reshape(q.shape[:3] + t.shape[-1:]).contiguous() for t in (grad_out, out))
    m = lse.reshape(q.shape[:3]).contiguous()
    grads = gradient(go, None, q, k, v, mask, o, m, 0.0, is_causal, scale, None, [True, True, True, False])
    return tuple(g.reshape(t.shape) for g, t in zip(grads[:3], (query, key, value), strict=True))


def _reference_block_gradients(grad_out, query, key, value, attn_mask, out, lse, is_causal, scale):
    """The same as ``_kernel_block_gradients``, in plain PyTorch from the math (the reference backend)."""
    acc = lse.dtype
    q, k, v, go, o = (t.to(acc) for t in (query, key, value, grad_out, out))
    groups = q.shape[-3] // k.shape[-3]
    if groups > 1:  # GQA: query head h reads kv head h // groups
        k, v = k.repeat_interleave(groups, dim=-3), v.repeat_interleave(groups, dim=-3)
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if is_causal:
        hidden = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(hidden, -math.inf)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, -math.inf) if attn_mask.dtype == torch.bool else scores + attn_mask
    row_lse = lse.unsqueeze(-1)
    # A row that attends to nothing (lse -inf) has probabilities 0 and no gradient.
    probs = torch.where(torch.isneginf(row_lse), 0.0, torch.exp(scores - row_lse))
    grad_v = torch.matmul(probs.transpose(-2, -1), go)
    grad_scores = probs * (torch.matmul(go, v.transpose(-2, -1)) - (go * o).sum(-1, keepdim=True))
    grad_q = torch.matmul(grad_scores, k) * scale
    grad_k = torch.matmul(grad_scores.transpose(-2, -1), q) * scale
    if groups > 1:
        grad_k = grad_k.unflatten(-3, (-1, groups)).sum(-3)
        grad_v = grad_v.unflatten(-3, (-1, groups)).sum(-3)
    return grad_q, grad_k, grad_v


def _block_gradients(backend: str, *args):
    gradient = attention_gradient(backend)
    if gradient is None:
        return _reference_block_gradients(*args)
    return _kernel_block_gradients(gradient, *args)


# ----------------------------------------------------------------------------- the ring


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, attn_mask, is_causal, scale, enable_gqa, backend, ring):
        acc = accumulation_dtype(query.dtype)
        query_length, key_length = query.shape[-2], key.shape[-2]
        out = query.new_zeros((*query.shape[:-1], value.shape[-1]), dtype=acc)
        lse = torch.full(query.shape[:-1], -math.inf, dtype=acc, device=query.device)
        block_key, block_value = key.contiguous(), value.contiguous()
        for step in range(ring.world):
            source = (ring.rank - step) % ring.world
            # The next block travels while this one is attended to.
            incoming = ring.shift([block_key, block_value]) if step + 1 < ring.world else None
            plan = ring.block_plan(source, query_length, key_length, is_causal)
            if plan is not None:
                rows, columns, causal = plan
                mask = None if attn_mask is None else ring.mask_columns(attn_mask, source, key_length)
                part_out, part_lse = attention_with_lse(
                    _rows(query, rows), _rows(block_key, columns), _rows(block_value, columns),
                    _mask_block(mask, rows, columns), 0.0, causal, scale, enable_gqa, backend=backend)
                merged_out, merged_lse = merge_attention([_rows(out, rows), part_out],
                                                         [lse[..., rows], part_lse.to(acc)])
                out[..., rows, :] = merged_out
                lse[..., rows] = merged_lse
            if incoming is not None:
                block_key, block_value = incoming.wait()
        out = out.to(query.dtype)
        ctx.save_for_backward(query, key, value, attn_mask, out, lse)
        ctx.options = (is_causal, scale, backend, ring)
        return out

    @staticmethod
    @once_differentiable  # a double backward would need the ring inside autograd
    def backward(ctx, grad_out):
        query, key, value, attn_mask, out, lse = ctx.saved_tensors
        is_causal, scale, backend, ring = ctx.options
        acc = lse.dtype
        query_length, key_length = query.shape[-2], key.shape[-2]
        grad_out = grad_out.contiguous()
        grad_query = torch.zeros(query.shape, dtype=acc, device=query.device)
        block_key, block_value = key.contiguous(), value.contiguous()
        block_grads = None  # gradients of the block in hand, accumulated by the ranks it visited before
        for step in range(ring.world):
            source = (ring.rank - step) % ring.world
            incoming = ring.shift([block_key, block_value]) if step + 1 < ring.world else None
            grad_key = torch.zeros(key.shape, dtype=acc, device=key.device)
            grad_value = torch.zeros(value.shape, dtype=acc, device=value.device)
            plan = ring.block_plan(source, query_length, key_length, is_causal)
            if plan is not None:
                rows, columns, causal = plan
                mask = None if attn_mask is None else ring.mask_columns(attn_mask, source, key_length)
                dq, dk, dv = _block_gradients(
                    backend, _rows(grad_out, rows), _rows(query, rows), _rows(block_key, columns),
                    _rows(block_value, columns), _mask_block(mask, rows, columns), _rows(out, rows), lse[..., rows],
                    causal, scale)
                grad_query[..., rows, :] += dq
                grad_key[..., columns, :] += dk
                grad_value[..., columns, :] += dv
            if block_grads is not None:
                arrived_key, arrived_value = block_grads.wait()
                grad_key += arrived_key
                grad_value += arrived_value
            if ring.world > 1:
                # The block's gradients follow it; the last hop takes them home to its owner.
                block_grads = ring.shift([grad_key, grad_value])
            if incoming is not None:
                block_key, block_value = incoming.wait()
        if block_grads is not None:
            grad_key, grad_value = block_grads.wait()
        return (grad_query.to(query.dtype), grad_key.to(key.dtype), grad_value.to(value.dtype),
                None, None, None, None, None, None)


def _check_mask(op: str, attn_mask, query, key, is_causal: bool, world: int) -> None:
    check_mask_kind(op, attn_mask, query, is_causal)
    if attn_mask.requires_grad:
        raise RuntimeError(f"attnkernels.{op}: a float `attn_mask` that requires grad is not supported (its "
                           "gradient is not computed); pass attn_mask.detach() or a bool mask")
    target = (*query.shape[:-1], key.shape[-2] * world)
    if not broadcasts_to(attn_mask, target):
        raise RuntimeError(f"attnkernels.{op}: expected `attn_mask` to hold this rank's rows of the full mask, "
                           f"broadcastable to (..., heads, L/P, S) = {list(target)}, got sizes "
                           f"{list(attn_mask.shape)} (shard_sequence(full_mask, dim=-2) gives them)")


def ring_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attn_mask: torch.Tensor | None = None, is_causal: bool = False, scale: float | None = None,
                   enable_gqa: bool = False, *, group=None, load_balance: bool = True,
                   backend: str | None = None) -> torch.Tensor:
    """Attention over a sequence split across the ranks of ``group``; this rank's rows of the output.

    query: (..., Hq, L/P, E); key: (..., Hkv, S/P, E); value: (..., Hkv, S/P, Ev): this rank's
        shards (``shard_sequence(full, dim=-2, load_balance=...)``), the same shapes on every rank
    attn_mask: None, or this rank's rows of the full mask, broadcastable to (..., Hq, L/P, S):
        bool (True = attend) or float (added to the scores, no gradient), rows in the layout of
        the queries, columns in the full sequence's order
    returns: (..., Hq, L/P, Ev), equal to this rank's rows of
        ``scaled_dot_product_attention`` on the full tensors, differentiable to query, key, value

    is_causal: top-left causal over the full sequence (needs L = S when P > 1); blocks above the
        diagonal are skipped. load_balance: the zig-zag layout (see the module docstring); pass
        False for contiguous chunks. scale, enable_gqa: as ``scaled_dot_product_attention``.
    group: a torch.distributed process group (default: the world); every rank of it must call
        this with matching shards and options: a mismatch raises on every rank. backend: the
        attnkernels backend that computes each block (None: the best for the inputs).
    """
    op = "ring_attention"
    group, rank, world = group_of(op, group)
    error, values = None, None
    try:
        *prepared, added = _prepare(op, query, key, value, None, 0.0, False, scale, enable_gqa)
        if added or any(p.shape != t.shape for p, t in zip(prepared[:3], (query, key, value), strict=True)):
            raise RuntimeError(f"attnkernels.{op}: expected query (..., Hq, L, E), key (..., Hkv, S, E) and value "
                               "(..., Hkv, S, Ev) with the same leading dimensions and Hkv dividing Hq, got sizes "
                               f"{list(query.shape)}, {list(key.shape)} and {list(value.shape)}")
        if attn_mask is not None:
            _check_mask(op, attn_mask, query, key, is_causal, world)
        query_length, key_length = query.shape[-2], key.shape[-2]
        if world > 1 and is_causal and query_length != key_length:
            raise RuntimeError(f"attnkernels.{op}: is_causal=True needs query and key shards of the same length, "
                               f"got {query_length} and {key_length}")
        if world > 1 and load_balance and (query_length % 2 or key_length % 2):
            raise RuntimeError(f"attnkernels.{op}: with load_balance=True each shard holds two equal chunks, so "
                               f"its length must be even, got query {query_length} and key {key_length} "
                               "(shard_sequence with the same load_balance gives such shards)")
        scale = default_scale(query.shape[-1]) if scale is None else float(scale)
        backend = attention_backend(op, query, key, value, attn_mask, 0.0, backend)
        values = {
            "dtype": (DTYPES.index(query.dtype),), "batch": listed_shape(query.shape[:-3]),
            "query_heads": (query.shape[-3],), "key_heads": (key.shape[-3],), "query_length": (query_length,),
            "key_length": (key_length,), "head_dim": (query.shape[-1],), "value_dim": (value.shape[-1],),
            "is_causal": (int(bool(is_causal)),), "load_balance": (int(bool(load_balance)),),
            "enable_gqa": (int(bool(enable_gqa)),), "scale": (float_bits(scale),),
            "mask": (int(attn_mask is not None),),
            "mask_is_bool": (int(attn_mask is not None and attn_mask.dtype == torch.bool),),
        }
    except (TypeError, ValueError, RuntimeError) as e:
        error = e
    agree(op, group, rank, world, RING_FIELDS, values, error)
    ring = _Ring(group, rank, world, load_balance)
    return _RingAttention.apply(query, key, value, attn_mask, bool(is_causal), scale, enable_gqa, backend, ring)


__all__ = ["ring_attention", "shard_sequence", "unshard_sequence"]
