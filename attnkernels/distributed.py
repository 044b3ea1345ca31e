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
import struct
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from .attention import _check_tensor, _prepare, attention_backend, attention_with_lse, check_mask_kind, merge_attention
from .reference.attention import accumulation_dtype, default_scale

# dtypes as small ints for the cross-rank check (attention takes the first four; shards of any)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool, torch.uint8, torch.int8,
           torch.int16, torch.int32, torch.int64, torch.complex64, torch.complex128)

# Batch dimensions compared one by one across ranks; more are compared through their product.
_MAX_LISTED_DIMS = 8


# ----------------------------------------------------------------------------- the group and the layout


def _group_of(op: str, group) -> tuple[object, int, int]:
    """(group, this process's rank in it, its size); raises when torch.distributed is not set up."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"attnkernels.{op}: torch.distributed is not initialised; call "
                           "torch.distributed.init_process_group first (torchrun sets up the environment for it)")
    if group is None:
        group = dist.group.WORLD
    rank = dist.get_rank(group)
    if rank < 0:
        raise RuntimeError(f"attnkernels.{op}: this process (global rank {dist.get_rank()}) is not a member of "
                           "`group`; call it only on the group's ranks")
    return group, rank, dist.get_world_size(group)


def _owned_chunks(rank: int, world: int, load_balance: bool) -> tuple[int, tuple[int, ...]]:
    """(number of equal chunks the sequence is cut into, the chunks this rank holds, in order)."""
    if load_balance:
        return 2 * world, (rank, 2 * world - 1 - rank)
    return world, (rank,)


def _exchange_device(group) -> torch.device:
    """Where small control tensors live: NCCL moves only CUDA tensors, gloo CPU ones."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _listed_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """A shape as a fixed number of ints: its length, up to 8 sizes (padded with -1), the product of any more."""
    sizes = list(shape)
    listed = sizes[:_MAX_LISTED_DIMS] + [-1] * (_MAX_LISTED_DIMS - min(len(sizes), _MAX_LISTED_DIMS))
    return (len(sizes), *listed, math.prod(sizes[_MAX_LISTED_DIMS:]))


def _shown(kind: str, values: tuple[int, ...]) -> str:
    if kind == "dtype":
        return str(_DTYPES[values[0]]) if 0 <= values[0] < len(_DTYPES) else "another dtype"
    if kind == "shape":
        ndim, sizes = values[0], values[1:1 + min(values[0], _MAX_LISTED_DIMS)]
        return str(list(sizes) + (["..."] if ndim > _MAX_LISTED_DIMS else []))
    if kind == "float":
        return repr(struct.unpack("<d", struct.pack("<q", values[0]))[0])
    if kind == "bool":
        return str(bool(values[0]))
    return str(values[0])


def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


# Each field of a call's description: (what it is called in an error, how it is shown, how many ints).
_RING_FIELDS = {
    "dtype": ("the dtype of query, key and value", "dtype", 1),
    "batch": ("the batch dimensions of query", "shape", _MAX_LISTED_DIMS + 2),
    "query_heads": ("the number of query heads", "int", 1),
    "key_heads": ("the number of key/value heads", "int", 1),
    "query_length": ("the query shard length (L/P)", "int", 1),
    "key_length": ("the key/value shard length (S/P)", "int", 1),
    "head_dim": ("the head dim E", "int", 1),
    "value_dim": ("the value head dim Ev", "int", 1),
    "is_causal": ("is_causal", "bool", 1),
    "load_balance": ("load_balance", "bool", 1),
    "enable_gqa": ("enable_gqa", "bool", 1),
    "scale": ("the scale", "float", 1),
    "mask": ("whether attn_mask is given", "bool", 1),
    "mask_is_bool": ("whether attn_mask is bool", "bool", 1),
}

_UNSHARD_FIELDS = {
    "dtype": ("the dtype of the shard", "dtype", 1),
    "shape": ("the shape of the shard", "shape", _MAX_LISTED_DIMS + 2),
}


def _agree(op: str, group, rank: int, world: int, fields: dict, values: dict | None, error: Exception | None) -> None:
    """Checks, on every rank at once, that every rank's call is valid and that all calls agree.

    values: this rank's description of its call (None when its own checks failed, with ``error``).
    One all_gather of a small int64 tensor; afterwards every rank raises, or none does, so a bad
    input on one rank never leaves the others waiting for a transfer that never comes.
    """
    widths = [width for _, _, width in fields.values()]
    row = [0 if error is None else 1]
    for name, width in zip(fields, widths, strict=True):
        row += list(values[name]) if values is not None else [0] * width
    local = torch.tensor(row, dtype=torch.int64, device=_exchange_device(group))
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local, group=group)
    table = torch.stack(gathered).tolist()
    if error is not None:
        raise error
    failed = [r for r in range(world) if table[r][0]]
    if failed:
        raise RuntimeError(f"attnkernels.{op}: rank(s) {failed} of the group rejected their inputs (their own error "
                           "says why); every rank must pass valid inputs")
    start = 1
    for (title, kind, width) in fields.values():
        column = [tuple(table[r][start:start + width]) for r in range(world)]
        start += width
        if any(c != column[0] for c in column):
            seen = ", ".join(f"rank {r} has {_shown(kind, c)}" for r, c in enumerate(column))
            raise RuntimeError(f"attnkernels.{op}: the ranks of the group disagree on {title}: {seen}. Every rank "
                               "must pass shards of the same shapes, dtype and options (shard_sequence splits a "
                               f"sequence evenly); this is rank {rank}")


# ----------------------------------------------------------------------------- shard / unshard


def shard_sequence(x: torch.Tensor, dim: int, *, group=None, load_balance: bool = True) -> torch.Tensor:
    """This rank's shard of a full sequence tensor, in the layout ``ring_attention`` expects.

    x: the full tensor, the same on every rank, with the sequence along ``dim`` (e.g. -2 for
        (..., H, L, E), or for a (..., L, S) mask's rows)
    returns: (..., L/P, ...): with load_balance, chunks r and 2P - 1 - r of 2P, concatenated;
        otherwise the r-th of P contiguous chunks. Differentiable (a copy of the slices; in a group of
        one process, ``x`` itself).
    """
    _check_tensor("shard_sequence", "x", x)
    group, rank, world = _group_of("shard_sequence", group)
    dim = dim % x.dim() if x.dim() > 0 else dim
    if world == 1:
        return x
    count, mine = _owned_chunks(rank, world, load_balance)
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
    group, rank, world = _group_of(op, group)
    error, values = None, None
    try:
        _check_tensor(op, "x", x)
        if load_balance and world > 1 and x.shape[dim] % 2:
            raise ValueError(f"attnkernels.{op}: with load_balance=True a shard holds two equal chunks, so its "
                             f"length along dim {dim} must be even, got {x.shape[dim]}")
        dtype_code = _DTYPES.index(x.dtype) if x.dtype in _DTYPES else -1
        values = {"dtype": (dtype_code,), "shape": _listed_shape(x.shape)}
    except (TypeError, ValueError, IndexError, RuntimeError) as e:
        error = e
    _agree(op, group, rank, world, _UNSHARD_FIELDS, values, error)
    if world == 1:
        return x
    pieces = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(world)]
    dist.all_gather(pieces, x.contiguous(), group=group)
    if not load_balance:
        return torch.cat(pieces, dim)
    halves = [piece.chunk(2, dim) for piece in pieces]
    # Rank r's halves are chunks r and 2P - 1 - r: the first halves in rank order, then the second ones reversed.
    return torch.cat([h[0] for h in halves] + [h[1] for h in reversed(halves)], dim)


# ----------------------------------------------------------------------------- point-to-point transfers


class _Transfer:
    """Tensors on their way round the ring: ``wait()`` returns the ones received from the previous rank."""

    def __init__(self, requests, sent, received):
        self._requests, self._sent, self.received = requests, sent, received

    def wait(self) -> list[torch.Tensor]:
        for request in self._requests:
            request.wait()
        self._sent = None  # the send buffers may be freed only once the sends are done
        return self.received


class _Ring:
    """The ring of a process group: who sends to whom, and which block of the sequence each rank owns."""

    def __init__(self, group, rank: int, world: int, load_balance: bool):
        self.group, self.rank, self.world, self.load_balance = group, rank, world, load_balance
        # P2POp takes global ranks
        self.next_peer = dist.get_global_rank(group, (rank + 1) % world) if world > 1 else None
        self.previous_peer = dist.get_global_rank(group, (rank - 1) % world) if world > 1 else None

    def shift(self, tensors: list[torch.Tensor]) -> _Transfer:
        """Starts sending ``tensors`` to the next rank and receiving the previous rank's into new buffers."""
        sent = [t.contiguous() for t in tensors]
        received = [torch.empty_like(t) for t in sent]
        ops = [dist.P2POp(dist.isend, t, self.next_peer, self.group) for t in sent]
        ops += [dist.P2POp(dist.irecv, t, self.previous_peer, self.group) for t in received]
        return _Transfer(dist.batch_isend_irecv(ops), sent, received)

    def block_plan(self, source: int, query_length: int, key_length: int,
                   is_causal: bool) -> tuple[slice, slice, bool] | None:
        """Which of this rank's query rows attend to which keys of ``source``'s block, and whether causally.

        Returns (rows, columns, causal) along the sequence dims, or None when the causal mask hides
        the whole block. Blocks below the diagonal are attended to in full, the diagonal block
        causally (top-left, valid because each rank's chunks keep their global order).
        """
        everything = slice(None)
        if not is_causal:
            return everything, everything, False
        if source == self.rank:
            return everything, everything, True
        if not self.load_balance:
            return (everything, everything, False) if source < self.rank else None
        # Zig-zag: this rank holds chunks r and 2P-1-r, the source chunks s and 2P-1-s.
        if source < self.rank:  # every query sees chunk s, no query sees chunk 2P-1-s
            return everything, slice(0, key_length // 2), False
        return slice(query_length // 2, None), everything, False  # only chunk 2P-1-r sees the block, all of it

    def mask_columns(self, attn_mask: torch.Tensor, source: int, key_length: int) -> torch.Tensor:
        """The columns of a (..., L/P, S) mask that belong to ``source``'s keys."""
        if attn_mask.shape[-1] == 1 or self.world == 1:
            return attn_mask
        _, chunks = _owned_chunks(source, self.world, self.load_balance)
        chunk = key_length // len(chunks)
        parts = [attn_mask.narrow(-1, i * chunk, chunk) for i in chunks]
        return parts[0] if len(parts) == 1 else torch.cat(parts, -1)


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


def _as_batched(t: torch.Tensor, tail: int) -> torch.Tensor:
    """(..., *last ``tail`` dims) as (B, *last dims), contiguous."""
    return t.reshape(-1, *t.shape[-tail:]).contiguous()


def _kernel_block_gradients(backend, grad_out, query, key, value, attn_mask, out, lse, is_causal, scale):
    """dQ, dK, dV of one block from the attnkernels gradient kernel, given the *global* out and lse.

    With the global lse the kernel's probabilities are the full softmax's entries for this block,
    and with the global out its row term rowsum(dO · O) is the full one, so the block's
    gradients are exactly its share of single-process attention's.
    """
    batch_shape = query.shape[:-3]
    hq, length, _ = query.shape[-3:]
    q, k, v = _as_batched(query, 3), _as_batched(key, 3), _as_batched(value, 3)
    go, o, m = _as_batched(grad_out, 3), _as_batched(out, 3), _as_batched(lse, 2)
    mask = None
    if attn_mask is not None:
        mask = attn_mask
        if mask.is_floating_point():
            mask = mask.to(lse.dtype)  # the kernels add masks in the accumulation dtype
        mask = mask.expand(*batch_shape, hq, length, key.shape[-2]).reshape(q.shape[0], hq, length, key.shape[-2])
    gradient_op = (torch.ops.attnkernels.triton_attention_backward if backend == "triton"
                   else torch.ops.attnkernels.attention_backward)
    grads = gradient_op(go, None, q, k, v, mask, o, m, 0.0, is_causal, scale, None, [True, True, True, False])
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


def _block_gradients(backend, *args):
    if backend == "reference":
        return _reference_block_gradients(*args)
    return _kernel_block_gradients(backend, *args)


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
    try:
        fits = attn_mask.dim() <= len(target) and torch.broadcast_shapes(attn_mask.shape, target) == target
    except RuntimeError:
        fits = False
    if not fits:
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
    group, rank, world = _group_of(op, group)
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
            "dtype": (_DTYPES.index(query.dtype),), "batch": _listed_shape(query.shape[:-3]),
            "query_heads": (query.shape[-3],), "key_heads": (key.shape[-3],), "query_length": (query_length,),
            "key_length": (key_length,), "head_dim": (query.shape[-1],), "value_dim": (value.shape[-1],),
            "is_causal": (int(bool(is_causal)),), "load_balance": (int(bool(load_balance)),),
            "enable_gqa": (int(bool(enable_gqa)),), "scale": (_float_bits(scale),),
            "mask": (int(attn_mask is not None),),
            "mask_is_bool": (int(attn_mask is not None and attn_mask.dtype == torch.bool),),
        }
    except (TypeError, ValueError, RuntimeError) as e:
        error = e
    _agree(op, group, rank, world, _RING_FIELDS, values, error)
    ring = _Ring(group, rank, world, load_balance)
    return _RingAttention.apply(query, key, value, attn_mask, bool(is_causal), scale, enable_gqa, backend, ring)


__all__ = ["ring_attention", "shard_sequence", "unshard_sequence"]
